//! The organisation: departments, users and roles, with etags and references.

use super::*;

pub async fn departments_crud_with_etags_and_no_cycles(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = create_department(&env, " Sales ", &office.id).await;
    assert_eq!(
        (sales.name.as_str(), sales.parent_id.as_str(), sales.etag.as_str()),
        ("Sales", office.id.as_str(), "1")
    );
    let east = create_department(&env, "Sales East", &sales.id).await;
    let west = create_department(&env, "Sales West", &sales.id).await;
    let got = env
        .api
        .get_department(req(&env.admin, GetDepartmentRequest { id: sales.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, sales);

    let children = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest {
                filter: format!("parent_id = \"{}\"", sales.id),
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(children.departments, vec![east.clone()]);
    let next = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest {
                filter: format!("parent_id = \"{}\"", sales.id),
                page_size: 1,
                page_token: children.next_page_token.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.departments, vec![west.clone()]);
    assert!(next.next_page_token.is_empty());
    let replayed = env
        .api
        .list_departments(req(
            &env.admin,
            ListDepartmentsRequest { page_token: children.next_page_token, ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&replayed), ["page_token"]);

    let update = |department: Department, paths: &[&str]| {
        env.api.update_department(req(
            &env.admin,
            UpdateDepartmentRequest { department: Some(department), update_mask: mask(paths) },
        ))
    };
    let renamed = update(
        Department { id: east.id.clone(), etag: "1".into(), name: "East".into(), ..Default::default() },
        &["name"],
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (renamed.name.as_str(), renamed.parent_id.as_str(), renamed.etag.as_str()),
        ("East", sales.id.as_str(), "2")
    );
    let stale = update(
        Department { id: east.id.clone(), etag: "1".into(), name: "Stale".into(), ..Default::default() },
        &["name"],
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    // A head: an existing user (here the administrator), or nobody.
    let headed = update(
        Department { id: east.id.clone(), head_id: env.admin.subject.clone(), ..Default::default() },
        &["head_id"],
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(headed.head_id, env.admin.subject);
    let no_user =
        update(Department { id: east.id.clone(), head_id: crm_kit::id::new(), ..Default::default() }, &["head_id"])
            .await
            .unwrap_err();
    assert_eq!(fields(&no_user), ["department.head_id"]);
    let unheaded = update(Department { id: east.id.clone(), ..Default::default() }, &["head_id"]).await.unwrap();
    assert!(unheaded.into_inner().head_id.is_empty());

    // Under itself, or under anything below it: refused.
    for parent in [&sales.id, &east.id] {
        let cycle = update(
            Department { id: sales.id.clone(), parent_id: parent.clone(), ..Default::default() },
            &["parent_id"],
        )
        .await
        .unwrap_err();
        assert_eq!(fields(&cycle), ["department.parent_id"], "{parent}");
    }
    let unknown = update(
        Department { id: sales.id.clone(), parent_id: crm_kit::id::new(), ..Default::default() },
        &["parent_id"],
    )
    .await
    .unwrap_err();
    assert_eq!(fields(&unknown), ["department.parent_id"]);
    // A legal move: West to the top level, then East under West.
    update(Department { id: west.id.clone(), ..Default::default() }, &["parent_id"]).await.unwrap();
    let moved =
        update(Department { id: east.id.clone(), parent_id: west.id.clone(), ..Default::default() }, &["parent_id"])
            .await
            .unwrap()
            .into_inner();
    assert_eq!(moved.parent_id, west.id);
    assert_eq!(events(&env, "type = department_moved").await.len(), 2);

    let delete = |id: &str, etag: &str| {
        env.api.delete_department(req(&env.admin, DeleteDepartmentRequest { id: id.into(), etag: etag.into() }))
    };
    assert_eq!(delete(&west.id, "").await.unwrap_err().code(), Code::FailedPrecondition, "it has a sub-department");
    create_user(&env, "east@example.com", "East person", &east.id, &[]).await;
    assert_eq!(delete(&east.id, "").await.unwrap_err().code(), Code::FailedPrecondition, "it has a user");
    assert_eq!(delete(&sales.id, "7").await.unwrap_err().code(), Code::Aborted);
    delete(&sales.id, &sales.etag).await.expect("empty department");
    let gone =
        env.api.get_department(req(&env.admin, GetDepartmentRequest { id: sales.id.clone() })).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let under_gone = Department { name: "Orphan".into(), parent_id: sales.id.clone(), ..Default::default() };
    let err = env
        .api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(under_gone) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["department.parent_id"]);
}

pub async fn users_crud_with_etags_and_references(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales_dept = create_department(&env, "Sales", &office.id).await;
    let sales = role_id(&env, SALESPERSON).await;
    let head = role_id(&env, HEAD_OF_DEPARTMENT).await;
    let boss = create_user(&env, "boss@example.com", "Boss", &sales_dept.id, &[&head]).await;
    let user = User {
        email: " Anna@Example.COM ".into(),
        display_name: "Anna".into(),
        phone: " +7 916 000 ".into(),
        department_id: sales_dept.id.clone(),
        supervisor_id: boss.id.clone(),
        role_ids: vec![sales.clone(), sales.clone()],
        active: false,
        ..Default::default()
    };
    let anna = env
        .api
        .create_user(req(&env.admin, CreateUserRequest { user: Some(user), password: PASSWORD.into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(anna.email, "anna@example.com");
    assert_eq!(anna.phone, "+7 916 000");
    assert_eq!(anna.role_ids, vec![sales.clone()]);
    assert!(anna.active, "new users are active");
    assert_eq!(anna.etag, "1");
    uuid::Uuid::parse_str(&anna.id).unwrap();
    let got = env.api.get_user(req(&env.admin, GetUserRequest { id: anna.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, anna);

    let duplicate = try_create_user(&env, "ANNA@example.com", "Other Anna", "", &[]).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let info = duplicate.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata.get("record_id"), Some(&anna.id));

    let missing = crm_kit::id::new();
    let err = try_create_user(&env, "x@example.com", "X", &missing, &[&missing]).await.unwrap_err();
    assert_eq!(fields(&err), ["user.department_id"]);
    let err = try_create_user(&env, "x@example.com", "X", "", &[&sales, &missing]).await.unwrap_err();
    let expected = if sales < missing { "user.role_ids[1]" } else { "user.role_ids[0]" };
    assert_eq!(fields(&err), [expected]);

    let patch = User { id: anna.id.clone(), etag: "1".into(), supervisor_id: missing.clone(), ..Default::default() };
    assert_eq!(fields(&update_user(&env, patch, &["supervisor_id"]).await.unwrap_err()), ["user.supervisor_id"]);
    let patch = User { id: anna.id.clone(), supervisor_id: anna.id.clone(), ..Default::default() };
    assert_eq!(fields(&update_user(&env, patch, &["supervisor_id"]).await.unwrap_err()), ["user.supervisor_id"]);
    let patch = User { id: anna.id.clone(), email: "boss@example.com".into(), ..Default::default() };
    assert_eq!(update_user(&env, patch, &["email"]).await.unwrap_err().code(), Code::AlreadyExists);

    let patch = User {
        id: anna.id.clone(),
        etag: "1".into(),
        display_name: "Anna Petrova".into(),
        phone: "ignored".into(),
        ..Default::default()
    };
    let updated = update_user(&env, patch, &["display_name"]).await.unwrap();
    assert_eq!(
        (updated.display_name.as_str(), updated.phone.as_str(), updated.etag.as_str()),
        ("Anna Petrova", "+7 916 000", "2")
    );
    assert_eq!(updated.role_ids, vec![sales.clone()]);
    let stale = User { id: anna.id.clone(), etag: "1".into(), display_name: "Stale".into(), ..Default::default() };
    assert_eq!(update_user(&env, stale, &["display_name"]).await.unwrap_err().code(), Code::Aborted);
    let unchanged = User { id: anna.id.clone(), display_name: "Anna Petrova".into(), ..Default::default() };
    assert_eq!(update_user(&env, unchanged, &["display_name"]).await.unwrap().etag, "2", "no change, no new version");

    // Many users, listed by name in pages, filtered.
    for i in 0..5 {
        create_user(&env, &format!("rep{i}@example.com"), &format!("Rep {i}"), &sales_dept.id, &[&sales]).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .api
            .list_users(req(
                &env.admin,
                ListUsersRequest {
                    filter: format!("department_id = \"{}\"", sales_dept.id),
                    page_size: 2,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.users.into_iter().map(|u| u.display_name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["Anna Petrova", "Boss", "Rep 0", "Rep 1", "Rep 2", "Rep 3", "Rep 4"]);
    let list = |filter: &str| {
        env.api.list_users(req(&env.admin, ListUsersRequest { filter: filter.into(), ..Default::default() }))
    };
    let by_email = list("email = \"ANNA@example.com\"").await.unwrap().into_inner().users;
    assert_eq!(by_email.len(), 1);
    assert_eq!(by_email[0].role_ids, vec![sales.clone()]);
    let reports = list(&format!("supervisor_id = \"{}\"", boss.id)).await.unwrap().into_inner().users;
    assert_eq!(reports.iter().map(|u| u.id.clone()).collect::<Vec<_>>(), vec![anna.id.clone()]);
    let deactivate = User { id: anna.id.clone(), active: false, ..Default::default() };
    update_user(&env, deactivate, &["active"]).await.unwrap();
    let inactive = list("active = false").await.unwrap().into_inner().users;
    assert_eq!(inactive.iter().map(|u| u.email.clone()).collect::<Vec<_>>(), ["anna@example.com"]);
    assert_eq!(list("active = true").await.unwrap().into_inner().users.len(), 7);
    assert_eq!(fields(&list("name = x").await.unwrap_err()), ["filter"]);
    assert_eq!(
        env.api.get_user(req(&env.admin, GetUserRequest { id: missing })).await.unwrap_err().code(),
        Code::NotFound
    );

    let changed = events(&env, &format!("user_id = \"{}\"", anna.id)).await;
    let kinds: Vec<&str> = changed.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(kinds, ["user_deactivated", "user_changed", "user_created"]);
    assert!(changed.iter().all(|e| e.actor_id == env.admin.subject));
}

pub async fn roles_crud_and_held_roles_stay(db: TestDb) {
    let env = env(db).await;
    let role = Role {
        name: "Auditor".into(),
        permissions: vec![ORG_READ.into(), CONTACTS_READ.into()],
        data_scope: DataScope::Department as i32,
        ..Default::default()
    };
    let auditor =
        env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(role) })).await.unwrap().into_inner();
    assert_eq!(auditor.permissions, [CONTACTS_READ, ORG_READ]);
    assert_eq!(auditor.etag, "1");
    let again = Role { name: " auditor ".into(), data_scope: DataScope::Own as i32, ..Default::default() };
    let duplicate = env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(again) })).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);

    let update = |role: Role, paths: &[&str]| {
        env.api.update_role(req(&env.admin, UpdateRoleRequest { role: Some(role), update_mask: mask(paths) }))
    };
    let patch = Role {
        id: auditor.id.clone(),
        etag: "1".into(),
        data_scope: DataScope::DepartmentTree as i32,
        name: "ignored".into(),
        ..Default::default()
    };
    let changed = update(patch, &["data_scope"]).await.unwrap().into_inner();
    assert_eq!(
        (changed.name.as_str(), changed.data_scope, changed.etag.as_str()),
        ("Auditor", DataScope::DepartmentTree as i32, "2")
    );
    let stale = Role { id: auditor.id.clone(), etag: "1".into(), name: "Stale".into(), ..Default::default() };
    assert_eq!(update(stale, &["name"]).await.unwrap_err().code(), Code::Aborted);
    let clash = Role { id: auditor.id.clone(), name: "SALESPERSON".into(), ..Default::default() };
    assert_eq!(update(clash, &["name"]).await.unwrap_err().code(), Code::AlreadyExists);
    let unspecified = Role { id: auditor.id.clone(), ..Default::default() };
    assert_eq!(fields(&update(unspecified, &["data_scope"]).await.unwrap_err()), ["role.data_scope"]);
    let got = env.api.get_role(req(&env.admin, GetRoleRequest { id: auditor.id.clone() })).await.unwrap().into_inner();
    assert_eq!(got, changed);

    let page = env
        .api
        .list_roles(req(&env.admin, ListRolesRequest { page_size: 2, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.roles.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), [ADMINISTRATOR, "Auditor"]);
    assert!(!page.next_page_token.is_empty());

    let user = create_user(&env, "aud@example.com", "Aud", "", &[&auditor.id]).await;
    let delete = |etag: &str| {
        env.api.delete_role(req(&env.admin, DeleteRoleRequest { id: auditor.id.clone(), etag: etag.into() }))
    };
    assert_eq!(delete("").await.unwrap_err().code(), Code::FailedPrecondition);
    update_user(&env, User { id: user.id.clone(), ..Default::default() }, &["role_ids"]).await.unwrap();
    assert_eq!(delete("1").await.unwrap_err().code(), Code::Aborted);
    delete("2").await.expect("nobody holds it");
    let gone = env.api.get_role(req(&env.admin, GetRoleRequest { id: auditor.id.clone() })).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let changes = events(&env, "type = role_changed").await;
    assert_eq!(changes.len(), 1);
    assert!(changes[0].detail.contains("DEPARTMENT -> DEPARTMENT_TREE"), "{}", changes[0].detail);
    assert_eq!(events(&env, "type = role_created").await.len(), 1);
    assert_eq!(events(&env, "type = role_deleted").await.len(), 1);
    let roles_changed = events(&env, "type = user_roles_changed").await;
    assert_eq!(roles_changed.len(), 1);
    assert_eq!(roles_changed[0].detail, "roles [Auditor] -> []");
}
