//! Data scope, record owners and permissions.

use super::*;

pub async fn data_scope_limits_every_call(env: Env) {
    let api = &env.api;
    let mut phone = 0;
    let mut records = Vec::new();
    for (owner, name) in [(ALICE, "Alice Client"), (BOB, "Bob Client"), (CAROL, "Carol Client"), (HEAD, "Head Client")]
    {
        phone += 1;
        records.push((owner, person_as(api, owner, name, &format!("+7 916 100-00-0{phone}")).await));
    }
    let visible_to = |user: &str, owner: &str| match user {
        ADMIN => true,
        HEAD => owner != CAROL,
        _ => user == owner,
    };
    for user in [ADMIN, HEAD, ALICE, BOB, CAROL] {
        let mut expected: Vec<String> =
            records.iter().filter(|(o, _)| visible_to(user, o)).map(|(_, p)| p.full_name.clone()).collect();
        expected.sort();
        assert_eq!(visible_names(api, user, "").await, expected, "list as {user}");
        assert_eq!(visible_names(api, user, "client").await, expected, "search as {user}");
        for (owner, record) in &records {
            let got = api.get_person(rw(user, GetPersonRequest { id: record.id.clone() })).await;
            let revisions = api
                .list_revisions(rw(user, ListRevisionsRequest { record_id: record.id.clone(), ..Default::default() }))
                .await;
            let mut patch = record.clone();
            patch.company_role = format!("changed by {user}");
            patch.etag = String::new();
            let update = UpdatePersonRequest {
                person: Some(patch),
                update_mask: Some(prost_types::FieldMask { paths: vec!["company_role".into()] }),
            };
            let updated = api.update_person(rw(user, update)).await;
            if visible_to(user, owner) {
                assert_eq!(got.unwrap().into_inner().id, record.id, "{user} gets {owner}'s record");
                assert!(!revisions.unwrap().into_inner().revisions.is_empty());
                assert_eq!(updated.unwrap().into_inner().company_role, format!("changed by {user}"));
            } else {
                assert_eq!(got.unwrap_err().code(), Code::NotFound, "{user} must not get {owner}'s record");
                assert_eq!(revisions.unwrap_err().code(), Code::NotFound);
                assert_eq!(updated.unwrap_err().code(), Code::NotFound);
                let delete = DeletePersonRequest { id: record.id.clone(), etag: String::new() };
                assert_eq!(api.delete_person(rw(user, delete)).await.unwrap_err().code(), Code::NotFound);
            }
        }
    }
    // A deleted record's history stays visible to those who could see the record, only.
    let bob_record = &records[1].1;
    api.delete_person(rw(HEAD, DeletePersonRequest { id: bob_record.id.clone(), etag: String::new() })).await.unwrap();
    let history = |user: &'static str| {
        api.list_revisions(rw(user, ListRevisionsRequest { record_id: bob_record.id.clone(), ..Default::default() }))
    };
    assert_eq!(history(HEAD).await.unwrap().into_inner().revisions.len(), 5);
    assert_eq!(history(BOB).await.unwrap().into_inner().revisions.len(), 5);
    assert_eq!(history(ALICE).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(history(CAROL).await.unwrap_err().code(), Code::NotFound);
}

pub async fn owners_are_assigned_within_scope(env: Env) {
    let api = &env.api;
    // A salesperson cannot create for a colleague.
    let mut p = person("For Bob", "+7 916 200-00-01", "for.bob@example.com");
    p.owner_id = BOB.into();
    let refused =
        api.create_person(rw(ALICE, CreatePersonRequest { person: Some(p.clone()), ..Default::default() })).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    // Their head can, and can hand the record over; the previous owner loses sight of it.
    let created =
        api.create_person(rw(HEAD, CreatePersonRequest { person: Some(p), ..Default::default() })).await.unwrap();
    let created = created.into_inner();
    assert_eq!(created.owner_id, BOB);
    let mut patch = created.clone();
    patch.owner_id = ALICE.into();
    let mask = Some(prost_types::FieldMask { paths: vec!["owner_id".into()] });
    let moved = api
        .update_person(rw(HEAD, UpdatePersonRequest { person: Some(patch.clone()), update_mask: mask.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.owner_id, ALICE);
    let get = |user: &'static str| api.get_person(rw(user, GetPersonRequest { id: created.id.clone() }));
    assert_eq!(get(BOB).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(ALICE).await.unwrap().into_inner().owner_id, ALICE);
    // The owner cannot give it away outside their scope, nor leave it ownerless.
    for owner in [CAROL, ""] {
        patch.owner_id = owner.into();
        patch.etag = String::new();
        let refused = api
            .update_person(rw(ALICE, UpdatePersonRequest { person: Some(patch.clone()), update_mask: mask.clone() }))
            .await
            .unwrap_err();
        let expected = if owner.is_empty() { Code::InvalidArgument } else { Code::PermissionDenied };
        assert_eq!(refused.code(), expected, "owner {owner:?}");
    }
    // Duplicate protection spans scopes and names the holder (SPEC C3).
    let duplicate = person("Same Phone", "+7 916 200-00-01", "same.phone@example.com");
    let refused = api
        .create_person(rw(CAROL, CreatePersonRequest { person: Some(duplicate), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert_eq!(refused.get_details_error_info().unwrap().metadata.get("owner_id").map(String::as_str), Some(ALICE));
}

pub async fn permissions_are_required(env: Env) {
    let api = &env.api;
    let refused = api.create_person(as_user(
        ALICE,
        &[CONTACTS_READ],
        CreatePersonRequest { person: Some(person("X", "+7 916 300-00-01", "x@example.com")), ..Default::default() },
    ));
    let refused = refused.await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("contacts.write"), "{}", refused.message());
    let list = api.list_people(as_user(ALICE, &[CONTACTS_READ], ListPeopleRequest::default())).await;
    assert!(list.unwrap().into_inner().people.is_empty());
    let nothing = as_user(ALICE, &[], ListPeopleRequest::default());
    assert_eq!(api.list_people(nothing).await.unwrap_err().code(), Code::PermissionDenied);
    let anonymous = Request::new(ListPeopleRequest::default());
    assert_eq!(api.list_people(anonymous).await.unwrap_err().code(), Code::Unauthenticated);
}

pub async fn owners_must_be_active_users(env: Env) {
    let api = &env.api;
    let nobody = "0190a000-0000-7000-8000-0000000000ff";
    // An owner that names no user is refused, even by someone who sees every record.
    let mut p = person("Orphan", "+7 916 400-00-01", "orphan@example.com");
    p.owner_id = nobody.into();
    let refused = api.create_person(req(CreatePersonRequest { person: Some(p.clone()), ..Default::default() }));
    let refused = refused.await.unwrap_err();
    assert_eq!(fields(&refused), ["person.owner_id"]);
    assert!(refused.message().contains("no user has this id"), "{}", refused.message());
    let company = Company { name: "Orphan Ltd".into(), owner_id: nobody.into(), ..Default::default() };
    let refused = api.create_company(req(CreateCompanyRequest { company: Some(company), ..Default::default() }));
    assert_eq!(fields(&refused.await.unwrap_err()), ["company.owner_id"]);

    // So is a deactivated user.
    env.org.set_status(BOB, UserStatus::Deactivated);
    p.owner_id = BOB.into();
    let refused = api.create_person(rw(HEAD, CreatePersonRequest { person: Some(p.clone()), ..Default::default() }));
    let refused = refused.await.unwrap_err();
    assert_eq!(fields(&refused), ["person.owner_id"]);
    assert!(refused.message().contains("deactivated"), "{}", refused.message());

    // An active user takes records, and a change of owner is checked the same way.
    p.owner_id = ALICE.into();
    let created = api.create_person(rw(HEAD, CreatePersonRequest { person: Some(p), ..Default::default() }));
    let created = created.await.expect("an active owner").into_inner();
    for owner in [nobody, BOB] {
        let patch = Person { id: created.id.clone(), owner_id: owner.into(), ..Default::default() };
        let refused =
            api.update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["owner_id"]) }));
        assert_eq!(fields(&refused.await.unwrap_err()), ["person.owner_id"], "owner {owner}");
    }
    // A record whose owner has left can still be edited without handing it over.
    env.org.set_status(ALICE, UserStatus::Deactivated);
    let patch = Person { notes: "Call after the holidays".into(), ..created.clone() };
    let updated = api.update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["*"]) }));
    let updated = updated.await.expect("the same owner needs no check").into_inner();
    assert_eq!((updated.owner_id.as_str(), updated.notes.as_str()), (ALICE, "Call after the holidays"));
}
