//! One record at a time: create, read, change, delete, duplicates, revisions, idempotency.

use super::*;

pub async fn people_crud(env: Env) {
    let api = &env.api;
    let created = create_person(api, person("Anna Petrova", "8 916 123-45-67", "Anna@Example.com")).await.unwrap();
    assert_eq!(created.phones[0].e164, "+79161234567");
    assert_eq!(created.emails[0].address, "anna@example.com");
    assert_eq!(created.etag, "1");
    assert!(created.create_time.is_some());
    uuid::Uuid::parse_str(&created.id).expect("uuid id");

    let got = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, created);

    let patch = Person {
        id: created.id.clone(),
        etag: created.etag.clone(),
        notes: "Prefers calls".into(),
        full_name: "ignored".into(),
        ..Default::default()
    };
    let updated = api
        .update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["notes"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.notes, "Prefers calls");
    assert_eq!(updated.full_name, "Anna Petrova", "fields outside the mask stay");
    assert_eq!(updated.etag, "2");
    assert_eq!(updated.create_time, created.create_time);
    let reread = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap().into_inner();
    assert_eq!(reread, updated);

    let page = list_people(api, "", "", "", 10, "").await.unwrap();
    assert_eq!(page.people, vec![updated.clone()]);
    assert!(page.next_page_token.is_empty());

    api.delete_person(req(DeletePersonRequest { id: created.id.clone(), etag: String::new() })).await.unwrap();
    let err = api.get_person(req(GetPersonRequest { id: created.id.clone() })).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        api.delete_person(req(DeletePersonRequest { id: created.id.clone(), etag: String::new() })).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The phone is free again.
    create_person(api, person("Anna P.", "+79161234567", "anna@example.com")).await.unwrap();
}

pub async fn companies_crud(env: Env) {
    let api = &env.api;
    let acme = create_company(api, "Acme, Inc.").await;
    assert_eq!(acme.name, "Acme, Inc.");
    let patch = Company {
        id: acme.id.clone(),
        stage: LifecycleStage::Customer as i32,
        tags: vec!["Key Account".into()],
        ..Default::default()
    };
    let updated = api
        .update_company(req(UpdateCompanyRequest { company: Some(patch), update_mask: mask(&["stage", "tags"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.stage, LifecycleStage::Customer as i32);
    assert_eq!(updated.tags, ["key account"]);
    assert_eq!(updated.name, "Acme, Inc.");
    let listed = api
        .list_companies(req(ListCompaniesRequest { filter: "stage = CUSTOMER".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.companies, vec![updated.clone()]);
    let listed = api
        .list_companies(req(ListCompaniesRequest {
            filter: "industry = retail AND tags:\"key account\"".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.companies.len(), 1);
    // In creation order a required tag is walked through the entries of one kind of record: a
    // company tagged on update, another on creation, a person beside them.
    let tagged = Company { name: "Globex".into(), tags: vec!["key account".into()], ..Default::default() };
    let globex = api
        .create_company(req(CreateCompanyRequest { company: Some(tagged), request_id: String::new() }))
        .await
        .unwrap()
        .into_inner();
    let mut someone = person("Key Person", "+7 901 000-00-01", "key@person.example");
    someone.tags = vec!["key account".into()];
    let someone = create_person(api, someone).await.unwrap();
    for (order_by, expected) in [("", [&globex.id, &acme.id]), ("create_time asc", [&acme.id, &globex.id])] {
        let listed = api
            .list_companies(req(ListCompaniesRequest {
                filter: "tags:\"key account\"".into(),
                order_by: order_by.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&String> = listed.companies.iter().map(|c| &c.id).collect();
        assert_eq!(ids, expected, "{order_by:?}");
    }
    let people = list_people(api, "tags:\"key account\"", "", "", 50, "").await.unwrap();
    assert_eq!(people.people.iter().map(|p| &p.id).collect::<Vec<_>>(), [&someone.id]);
    api.delete_company(req(DeleteCompanyRequest { id: acme.id.clone(), etag: updated.etag })).await.unwrap();
    assert_eq!(api.get_company(req(GetCompanyRequest { id: acme.id })).await.unwrap_err().code(), Code::NotFound);
}

pub async fn duplicates_are_refused_naming_the_holder(env: Env) {
    let api = &env.api;
    let owner = uuid::Uuid::now_v7().to_string();
    // A user of the organisation (records go only to existing, active users).
    env.org.set_status(&owner, UserStatus::Active);
    let mut first = person("Ivan Sidorov", "+7 495 000-11-22", "ivan@corp.ru");
    first.owner_id = owner.clone();
    let first = create_person(api, first).await.unwrap();

    for dup in [
        person("Someone Else", "8 (495) 000 11 22", "other@corp.ru"),
        person("Someone Else", "+7 999 000-00-01", "IVAN@corp.RU"),
    ] {
        let err = create_person(api, dup).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains(&first.id), "{}", err.message());
        assert!(err.message().contains(&owner), "{}", err.message());
        let info = err.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "DUPLICATE_RECORD");
        assert_eq!(info.metadata["record_id"], first.id);
        assert_eq!(info.metadata["owner_id"], owner);
    }
    // Nothing of the refused records was stored.
    let all = list_people(api, "", "", "", 100, "").await.unwrap();
    assert_eq!(all.people.len(), 1);

    // Updating another record onto a taken e-mail is refused too.
    let other = create_person(api, person("Petr", "+7 900 000-00-02", "petr@corp.ru")).await.unwrap();
    let patch = Person {
        id: other.id.clone(),
        emails: vec![Email { address: "ivan@corp.ru".into(), label: String::new() }],
        ..Default::default()
    };
    let err = api
        .update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["emails"]) }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let still = api.get_person(req(GetPersonRequest { id: other.id })).await.unwrap().into_inner();
    assert_eq!(still.emails[0].address, "petr@corp.ru");

    create_company(api, "ООО «Ромашка»").await;
    let err = api
        .create_company(req(CreateCompanyRequest {
            company: Some(Company { name: "Ромашка ООО".into(), ..Default::default() }),
            request_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

pub async fn check_duplicates_reports_matches(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Olga", "+7 912 345-67-89", "olga@shop.ru")).await.unwrap();
    let c = create_company(api, "Blue Sky Ltd").await;
    let r = api
        .check_duplicates(req(CheckDuplicatesRequest {
            record_type: RecordType::Person as i32,
            phones: vec!["8 912 345 67 89".into()],
            emails: vec!["nobody@shop.ru".into()],
            company_name: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.matches.len(), 1);
    assert_eq!((r.matches[0].field.as_str(), r.matches[0].record_id.as_str()), ("phone", p.id.as_str()));
    assert_eq!(r.matches[0].display_name, "Olga");
    let r = api
        .check_duplicates(req(CheckDuplicatesRequest {
            record_type: RecordType::Company as i32,
            company_name: "BLUE SKY".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.matches[0].record_id, c.id);
    let err = api
        .check_duplicates(req(CheckDuplicatesRequest { phones: vec!["abc".into()], ..Default::default() }))
        .await
        .unwrap_err();
    let fields: Vec<String> =
        err.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["record_type", "phones[0]"]);
}

pub async fn revisions_record_every_change(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Maria", "+7 901 111-22-33", "maria@x.ru")).await.unwrap();
    let patch = Person { id: p.id.clone(), stage: LifecycleStage::Customer as i32, ..Default::default() };
    api.update_person(req(UpdatePersonRequest { person: Some(patch), update_mask: mask(&["stage"]) })).await.unwrap();
    // An update that changes nothing writes no revision.
    let same = Person { id: p.id.clone(), stage: LifecycleStage::Customer as i32, ..Default::default() };
    let unchanged = api
        .update_person(req(UpdatePersonRequest { person: Some(same), update_mask: mask(&["stage"]) }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.etag, "2");
    api.delete_person(req(DeletePersonRequest { id: p.id.clone(), etag: "2".into() })).await.unwrap();

    let first = api
        .list_revisions(req(ListRevisionsRequest { record_id: p.id.clone(), page_size: 2, page_token: String::new() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.revisions.iter().map(|r| r.version).collect::<Vec<_>>(), [3, 2]);
    let deleted = &first.revisions[0];
    assert_eq!(deleted.action, revision::Action::Delete as i32);
    assert!(deleted.changes.iter().any(|c| c.field == "full_name" && c.old_value == "Maria" && c.new_value.is_empty()));
    let update = &first.revisions[1];
    assert_eq!(update.action, revision::Action::Update as i32);
    assert_eq!(update.changes.len(), 1);
    assert_eq!((update.changes[0].old_value.as_str(), update.changes[0].new_value.as_str()), ("LEAD", "CUSTOMER"));
    assert_eq!(update.actor, ADMIN);
    assert!(update.create_time.is_some());

    let rest = api
        .list_revisions(req(ListRevisionsRequest {
            record_id: p.id.clone(),
            page_size: 2,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.revisions.len(), 1);
    assert_eq!(rest.revisions[0].action, revision::Action::Create as i32);
    assert_eq!(rest.revisions[0].record_type, RecordType::Person as i32);
    assert!(rest.revisions[0].changes.iter().any(|c| c.field == "emails" && c.new_value == r#"["maria@x.ru"]"#));
    assert!(rest.next_page_token.is_empty());
}

pub async fn stale_etag_is_aborted(env: Env) {
    let api = &env.api;
    let p = create_person(api, person("Egor", "+7 902 000-00-00", "egor@x.ru")).await.unwrap();
    let first = Person { id: p.id.clone(), etag: p.etag.clone(), notes: "first".into(), ..Default::default() };
    api.update_person(req(UpdatePersonRequest { person: Some(first), update_mask: mask(&["notes"]) })).await.unwrap();
    let stale = Person { id: p.id.clone(), etag: p.etag.clone(), notes: "second".into(), ..Default::default() };
    let err = api
        .update_person(req(UpdatePersonRequest { person: Some(stale), update_mask: mask(&["notes"]) }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let err = api.delete_person(req(DeletePersonRequest { id: p.id.clone(), etag: "1".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let now = api.get_person(req(GetPersonRequest { id: p.id })).await.unwrap().into_inner();
    assert_eq!(now.notes, "first");
}

pub async fn bad_input_lists_field_violations(env: Env) {
    let api = &env.api;
    let bad = Person {
        full_name: "".into(),
        phones: vec![Phone { number: "not a phone".into(), ..Default::default() }],
        emails: vec![Email { address: "x@".into(), label: String::new() }],
        company_id: "not-a-uuid".into(),
        ..Default::default()
    };
    let err = create_person(api, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        err.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(
        fields,
        ["person.full_name", "person.company_id", "person.phones[0].number", "person.emails[0].address"]
    );

    let missing_company =
        Person { full_name: "X".into(), company_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    let err = create_person(api, missing_company).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("person.company_id"), "{}", err.message());

    let err = api.get_person(req(GetPersonRequest { id: "1; DROP TABLE people".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = api.create_person(req(CreatePersonRequest::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let p = create_person(api, person("Valid", "+7 903 000-00-00", "valid@x.ru")).await.unwrap();
    let err = api
        .update_person(req(UpdatePersonRequest {
            person: Some(Person { id: p.id.clone(), ..Default::default() }),
            update_mask: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, "update_mask");
    let err = api
        .update_person(req(UpdatePersonRequest {
            person: Some(Person { id: p.id.clone(), ..Default::default() }),
            update_mask: mask(&["full_name"]),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, "person.full_name");

    for (filter, order, token, field) in [
        ("owner_id = 'x' OR", "", "", "filter"),
        ("nonsense = 1", "", "", "filter"),
        ("", "phones", "", "order_by"),
        ("", "", "garbage", "page_token"),
    ] {
        let err = list_people(api, filter, "", order, 10, token).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, field);
    }
    let err = list_people(api, "", "", "", -1, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The table survived every attempt.
    assert_eq!(list_people(api, "", "", "", 10, "").await.unwrap().people.len(), 1);
}

pub async fn create_is_idempotent_by_request_id(env: Env) {
    let api = &env.api;
    let request = || CreatePersonRequest {
        person: Some(person("Retry", "+7 904 000-00-00", "retry@x.ru")),
        request_id: "req-42".into(),
    };
    let a = api.create_person(req(request())).await.unwrap().into_inner();
    let b = api.create_person(req(request())).await.unwrap().into_inner();
    assert_eq!(a, b);
    assert_eq!(list_people(api, "", "", "", 10, "").await.unwrap().people.len(), 1);
    let err = api
        .create_company(req(CreateCompanyRequest {
            company: Some(Company { name: "Other".into(), ..Default::default() }),
            request_id: "req-42".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

pub async fn company_with_people_cannot_be_deleted(env: Env) {
    let api = &env.api;
    let c = create_company(api, "Globex").await;
    let mut p = person("Hank", "+7 905 000-00-00", "hank@globex.com");
    p.company_id = c.id.clone();
    let p = create_person(api, p).await.unwrap();
    let err =
        api.delete_company(req(DeleteCompanyRequest { id: c.id.clone(), etag: String::new() })).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    api.delete_person(req(DeletePersonRequest { id: p.id, etag: String::new() })).await.unwrap();
    api.delete_company(req(DeleteCompanyRequest { id: c.id, etag: String::new() })).await.unwrap();
}

pub async fn concurrent_creates_of_one_phone_admit_one(env: Env) {
    let api = env.api.clone();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                create_person(&api, person(&format!("Racer {i}"), "+7 906 000-00-00", &format!("r{i}@x.ru"))).await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(list_people(&api, "", "", "", 10, "").await.unwrap().people.len(), 1);
}

pub async fn request_ids_are_scoped_to_the_caller(env: Env) {
    let api = &env.api;
    let create = |user: &'static str, name: &'static str, phone: &'static str| {
        let email = format!("{}@example.com", name.to_lowercase().replace([' ', '\''], "."));
        api.create_person(rw(
            user,
            CreatePersonRequest { person: Some(person(name, phone, &email)), request_id: "shared-request-id".into() },
        ))
    };
    let alice = create(ALICE, "Alice Lead", "+7 907 000-00-01").await.expect("Alice creates").into_inner();
    // Carol happens to pick the same request id: she creates a record of her own and learns
    // nothing about Alice's.
    let carol = create(CAROL, "Carol Lead", "+7 907 000-00-02").await.expect("Carol creates").into_inner();
    assert_ne!(carol.id, alice.id);
    assert_eq!((carol.full_name.as_str(), carol.owner_id.as_str()), ("Carol Lead", CAROL));
    // Each one's retry still returns what they created.
    assert_eq!(create(ALICE, "Alice Lead", "+7 907 000-00-01").await.unwrap().into_inner(), alice);
    assert_eq!(create(CAROL, "Carol Lead", "+7 907 000-00-02").await.unwrap().into_inner(), carol);
    assert_eq!(list_people(api, "", "", "", 10, "").await.unwrap().people.len(), 2);
}

/// What a salesperson can learn of records outside their scope: that a value is taken, by
/// which record id and owner — never the record's content; and a company they cannot see is
/// answered exactly like one that does not exist.
pub async fn nothing_leaks_outside_the_scope(env: Env) {
    let api = &env.api;
    let carols = person_as(api, CAROL, "Carol Secret Customer", "+7 913 555-00-11").await;
    let company = api
        .create_company(rw(
            CAROL,
            CreateCompanyRequest {
                company: Some(Company { name: "Carol Secret Company".into(), ..Default::default() }),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();

    // Alice enters the same phone: refused, naming the holder's id and owner only.
    let copy = person("Alice Entry", "8 913 555 00 11", "alice.entry@example.com");
    let refused = api
        .create_person(rw(ALICE, CreatePersonRequest { person: Some(copy), request_id: String::new() }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists);
    assert!(!refused.message().contains("Secret"), "{}", refused.message());
    assert!(refused.message().contains(&carols.id) && refused.message().contains(CAROL), "{}", refused.message());
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert!(info.metadata.values().all(|v| !v.contains("Secret")), "{info:?}");
    assert_eq!(info.metadata.get("record_id"), Some(&carols.id));

    // The duplicate check: the name only for whoever may see the record.
    let check = |user: &'static str| {
        api.check_duplicates(rw(
            user,
            CheckDuplicatesRequest {
                record_type: RecordType::Person as i32,
                phones: vec!["+79135550011".into()],
                ..Default::default()
            },
        ))
    };
    let theirs = check(ALICE).await.unwrap().into_inner().matches;
    assert_eq!(theirs.len(), 1);
    assert_eq!((theirs[0].record_id.as_str(), theirs[0].owner_id.as_str()), (carols.id.as_str(), CAROL));
    assert_eq!(theirs[0].display_name, "", "outside Alice's scope");
    let own = check(CAROL).await.unwrap().into_inner().matches;
    assert_eq!(own[0].display_name, "Carol Secret Customer");
    let admin = api
        .check_duplicates(req(CheckDuplicatesRequest {
            record_type: RecordType::Company as i32,
            company_name: "carol secret company".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .matches;
    assert_eq!(admin[0].display_name, "Carol Secret Company");

    // Linking to Carol's company and to no company at all: one answer.
    let link = |company_id: String| {
        let p = Person { full_name: "Alice Link".into(), company_id, ..Default::default() };
        api.create_person(rw(ALICE, CreatePersonRequest { person: Some(p), request_id: String::new() }))
    };
    let hidden = link(company.id.clone()).await.unwrap_err();
    let missing = link(uuid::Uuid::now_v7().to_string()).await.unwrap_err();
    assert_eq!((hidden.code(), hidden.message()), (missing.code(), missing.message()));
    assert_eq!(fields(&hidden), ["person.company_id"]);
    assert_eq!(hidden.details(), missing.details());
    // Carol herself links to it.
    let p = Person { full_name: "Carol Link".into(), company_id: company.id.clone(), ..Default::default() };
    api.create_person(rw(CAROL, CreatePersonRequest { person: Some(p), request_id: String::new() })).await.unwrap();
    // And an update that moves Alice's record to Carol's company is refused the same way.
    let alices = person_as(api, ALICE, "Alice Own", "+7 913 555-00-12").await;
    let moved = Person { id: alices.id.clone(), company_id: company.id.clone(), ..Default::default() };
    let refused = api
        .update_person(rw(ALICE, UpdatePersonRequest { person: Some(moved), update_mask: mask(&["company_id"]) }))
        .await
        .unwrap_err();
    assert_eq!((refused.code(), refused.message()), (missing.code(), missing.message()));
}

/// Activity records logged in the tasks service (their events) move a customer's last activity
/// forward only, without a new version; repeats and late arrivals change nothing.
pub async fn activities_move_the_last_activity(env: Env) {
    use crm_kit::events::Handler;
    let anna = create_person(&env.api, person("Anna Petrova", "+7 916 555-01-02", "anna.p@example.com")).await.unwrap();
    let intake = crm_contacts::intake::Intake::new(env.store.clone());
    let logged = |at: i64, summary: &str| crm_kit::events::Delivered {
        envelope: crm_kit::events::envelope::envelope(
            "tasks",
            "activity",
            ALICE,
            &crm_proto::tasks::v1::ActivityLogged {
                summary: summary.into(),
                occur_time: crm_kit::time::to_timestamp(at),
                customer_type: RecordType::Person as i32,
                customer_id: anna.id.clone(),
                ..Default::default()
            },
        ),
        seq: 1,
        redelivered: false,
    };
    let (t1, t2) = (1_780_000_000_000_000, 1_780_000_600_000_000);
    let newer = logged(t2, "Agreed on the renewal");
    let older = logged(t1, "First call");
    // A batch holding both, then each again alone: the newest stays.
    let mut tx = env.store.db().begin_write().await.unwrap();
    intake.handle_batch(&mut tx, &[&older, &newer]).await.unwrap();
    tx.commit().await.unwrap();
    for event in [&older, &newer] {
        let mut tx = env.store.db().begin_write().await.unwrap();
        intake.handle(&mut tx, event).await.unwrap();
        tx.commit().await.unwrap();
    }
    let got = env.api.get_person(req(GetPersonRequest { id: anna.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got.last_activity_time, crm_kit::time::to_timestamp(t2));
    assert_eq!(got.last_activity_summary, "Agreed on the renewal");
    assert_eq!(got.etag, anna.etag, "no new version");
    let filter = format!("last_activity_time > \"{}\"", crm_kit::time::format_rfc3339(t1));
    let list = env.api.list_people(req(ListPeopleRequest { filter, ..Default::default() })).await.unwrap().into_inner();
    assert_eq!(list.people.len(), 1, "the filter sees the new time");
}

/// Other services look many customers up at once, through the caller's scope.
pub async fn customers_are_looked_up_in_one_call(env: Env) {
    let anna = create_person(&env.api, person("Anna Petrova", "+7 916 555-01-02", "anna.p@example.com")).await.unwrap();
    let acme = create_company(&env.api, "Acme").await;
    let keys = vec![
        CustomerKey { record_type: RecordType::Company as i32, id: acme.id.clone() },
        CustomerKey { record_type: RecordType::Person as i32, id: crm_kit::id::new() },
        CustomerKey { record_type: RecordType::Person as i32, id: anna.id.clone() },
        CustomerKey { record_type: RecordType::Person as i32, id: acme.id.clone() },
    ];
    let found = env
        .api
        .batch_get_customers(req(BatchGetCustomersRequest { customers: keys.clone() }))
        .await
        .unwrap()
        .into_inner()
        .customers;
    let names: Vec<&str> = found.iter().map(|c| c.display_name.as_str()).collect();
    assert_eq!(names, ["Acme", "Anna Petrova"], "in the order asked; unknown ids and wrong kinds left out");
    let carol = env
        .api
        .batch_get_customers(as_user(CAROL, &[CONTACTS_READ], BatchGetCustomersRequest { customers: keys }))
        .await
        .unwrap()
        .into_inner();
    assert!(carol.customers.is_empty(), "the administrator's records are outside Carol's scope");
    let bad = vec![CustomerKey { record_type: 0, id: "x".into() }];
    let err = env.api.batch_get_customers(req(BatchGetCustomersRequest { customers: bad })).await.unwrap_err();
    assert_eq!(fields(&err), ["customers[0].record_type", "customers[0].id"]);
}

/// Deals won with a customer (the deals service's events) make its purchase history: count,
/// last purchase and value per currency; a win undone takes its deal out; repeats change nothing.
pub async fn won_deals_make_the_purchase_history(env: Env) {
    use crm_kit::events::Handler;
    let anna = create_person(&env.api, person("Anna Petrova", "+7 916 555-01-03", "anna.h@example.com")).await.unwrap();
    let intake = crm_contacts::intake::Intake::new(env.store.clone());
    let event = |payload: &dyn Fn() -> crm_proto::events::v1::Envelope| crm_kit::events::Delivered {
        envelope: payload(),
        seq: 1,
        redelivered: false,
    };
    let won = |deal: &str, currency: &str, amount: i64, at: i64| {
        let deal = deal.to_string();
        let (currency, anna_id) = (currency.to_string(), anna.id.clone());
        event(&move || {
            crm_kit::events::envelope::envelope(
                "deals",
                &deal,
                ALICE,
                &crm_proto::deals::v1::DealWon {
                    deal_id: deal.clone(),
                    person_id: anna_id.clone(),
                    amount: Some(crm_proto::deals::v1::Money { currency_code: currency.clone(), minor_units: amount }),
                    close_time: crm_kit::time::to_timestamp(at),
                    ..Default::default()
                },
            )
        })
    };
    let undone = |deal: &str| {
        let (deal, anna_id) = (deal.to_string(), anna.id.clone());
        event(&move || {
            crm_kit::events::envelope::envelope(
                "deals",
                &deal,
                ALICE,
                &crm_proto::deals::v1::DealWinUndone {
                    deal_id: deal.clone(),
                    person_id: anna_id.clone(),
                    ..Default::default()
                },
            )
        })
    };
    let (t1, t2) = (1_780_000_000_000_000, 1_781_000_000_000_000);
    let events = [
        won("d1", "EUR", 10_000, t1),
        won("d1", "EUR", 12_000, t1),
        won("d2", "USD", 500, t2),
        won("d3", "EUR", 1, t2),
    ];
    let refs: Vec<&crm_kit::events::Delivered> = events.iter().collect();
    let mut tx = env.store.db().begin_write().await.unwrap();
    intake.handle_batch(&mut tx, &refs).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = env.store.db().begin_write().await.unwrap();
    intake.handle(&mut tx, &undone("d3")).await.unwrap();
    tx.commit().await.unwrap();
    let got = env.api.get_person(req(GetPersonRequest { id: anna.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got.purchase_count, 2);
    assert_eq!(got.last_purchase_time, crm_kit::time::to_timestamp(t2));
    let values: Vec<(String, i64)> =
        got.lifetime_value.iter().map(|v| (v.currency_code.clone(), v.minor_units)).collect();
    assert_eq!(values, [("EUR".to_string(), 12_000), ("USD".to_string(), 500)], "the amount changed, not added");
    assert_eq!(got.etag, anna.etag, "no new version");
    let buyers = env
        .api
        .list_people(req(ListPeopleRequest { filter: "purchase_count >= 2".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(buyers.people.len(), 1);
    let bad = env
        .api
        .list_people(req(ListPeopleRequest { filter: "purchase_count >= many".into(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(fields(&bad), ["filter"]);
}
