//! Who sees and may do what: data scopes, permissions, the audit, and input validation.

use super::*;

pub async fn visibility_follows_the_organisation(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = create_department(&env, "Sales", &office.id).await;
    let east = create_department(&env, "Sales East", &sales.id).await;
    let lead_role = Role {
        name: "Team lead".into(),
        permissions: vec![CONTACTS_READ.into(), CONTACTS_WRITE.into()],
        data_scope: DataScope::Department as i32,
        ..Default::default()
    };
    let lead_role = env
        .api
        .create_role(req(&env.admin, CreateRoleRequest { role: Some(lead_role) }))
        .await
        .unwrap()
        .into_inner()
        .id;
    let (executive, head, rep) =
        (role_id(&env, EXECUTIVE).await, role_id(&env, HEAD_OF_DEPARTMENT).await, role_id(&env, SALESPERSON).await);

    let ceo = create_user(&env, "ceo@example.com", "CEO", &office.id, &[&executive]).await;
    let h1 = create_user(&env, "h1@example.com", "Head of sales", &sales.id, &[&head]).await;
    let s1 = create_user(&env, "s1@example.com", "Rep 1", &sales.id, &[&rep]).await;
    let h2 = create_user(&env, "h2@example.com", "Head of east", &east.id, &[&lead_role, &rep]).await;
    let s2 = create_user(&env, "s2@example.com", "Rep 2", &east.id, &[&rep]).await;
    let s3 = create_user(&env, "s3@example.com", "Rep 3", &east.id, &[&rep]).await;
    let gone = create_user(&env, "s4@example.com", "Rep 4", &east.id, &[&rep]).await;
    let nobody = create_user(&env, "s5@example.com", "Rep 5", "", &[]).await;
    update_user(&env, User { id: gone.id.clone(), ..Default::default() }, &["active"]).await.unwrap();

    let (p_ceo, p_h1, p_h2, p_s2, p_nobody) = (
        login(&env, "ceo@example.com", PASSWORD).await,
        login(&env, "h1@example.com", PASSWORD).await,
        login(&env, "h2@example.com", PASSWORD).await,
        login(&env, "s2@example.com", PASSWORD).await,
        login(&env, "s5@example.com", PASSWORD).await,
    );
    let ceo_sees = visibility(&env, &p_ceo).await.unwrap();
    assert!(ceo_sees.all && ceo_sees.owner_ids.is_empty());
    assert_eq!(ceo_sees.data_scope, DataScope::All as i32);
    let ids = |users: &[&User]| sorted(users.iter().map(|u| u.id.clone()).collect());

    let h1_sees = visibility(&env, &p_h1).await.unwrap();
    assert!(!h1_sees.all);
    assert_eq!(h1_sees.data_scope, DataScope::DepartmentTree as i32);
    assert_eq!(h1_sees.owner_ids, ids(&[&h1, &s1, &h2, &s2, &s3, &gone]), "the subtree, people who left included");
    let h2_sees = visibility(&env, &p_h2).await.unwrap();
    assert_eq!(h2_sees.data_scope, DataScope::Department as i32);
    assert_eq!(h2_sees.owner_ids, ids(&[&h2, &s2, &s3, &gone]));
    let s2_sees = visibility(&env, &p_s2).await.unwrap();
    assert_eq!((s2_sees.owner_ids.clone(), s2_sees.data_scope), (vec![s2.id.clone()], DataScope::Own as i32));
    assert_eq!(visibility(&env, &p_nobody).await.unwrap().owner_ids, vec![nobody.id.clone()], "no roles: own");

    // Moving a user changes what others see at once, token or no token.
    update_user(
        &env,
        User { id: s3.id.clone(), department_id: sales.id.clone(), ..Default::default() },
        &["department_id"],
    )
    .await
    .unwrap();
    assert_eq!(visibility(&env, &p_h2).await.unwrap().owner_ids, ids(&[&h2, &s2, &gone]));
    assert_eq!(visibility(&env, &p_h1).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s2, &s3, &gone]));
    // The caller's own current department counts, not the one in their token.
    update_user(
        &env,
        User { id: h2.id.clone(), department_id: sales.id.clone(), ..Default::default() },
        &["department_id"],
    )
    .await
    .unwrap();
    assert_eq!(visibility(&env, &p_h2).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s3]));
    // A whole department moving out of the tree leaves the head's view.
    let elsewhere = create_department(&env, "Elsewhere", &office.id).await;
    env.api
        .update_department(req(
            &env.admin,
            UpdateDepartmentRequest {
                department: Some(Department {
                    id: east.id.clone(),
                    parent_id: elsewhere.id.clone(),
                    ..Default::default()
                }),
                update_mask: mask(&["parent_id"]),
            },
        ))
        .await
        .unwrap();
    assert_eq!(visibility(&env, &p_h1).await.unwrap().owner_ids, ids(&[&h1, &s1, &h2, &s3]));

    let me = env.api.get_me(req(&p_h1, GetMeRequest {})).await.unwrap().into_inner();
    assert_eq!(me.subject, h1.id);
    assert_eq!(me.display_name, "Head of sales");
    assert_eq!(me.email, "h1@example.com");
    assert_eq!(me.department_id, sales.id);
    assert_eq!(me.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);
    assert_eq!(me.data_scope, DataScope::DepartmentTree as i32);

    // A deactivated caller resolves nothing, even with a token still unexpired.
    update_user(&env, User { id: s2.id.clone(), ..Default::default() }, &["active"]).await.unwrap();
    assert_eq!(visibility(&env, &p_s2).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(env.api.get_me(req(&p_s2, GetMeRequest {})).await.unwrap_err().code(), Code::Unauthenticated);
    let _ = ceo;
}

pub async fn permissions_are_enforced(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let (executive, rep) = (role_id(&env, EXECUTIVE).await, role_id(&env, SALESPERSON).await);
    create_user(&env, "exec@example.com", "Exec", &office.id, &[&executive]).await;
    let sam = create_user(&env, "sam@example.com", "Sam", &office.id, &[&rep]).await;
    let exec = login(&env, "exec@example.com", PASSWORD).await;
    let salesperson = login(&env, "sam@example.com", PASSWORD).await;
    assert!(exec.has(ORG_READ) && !exec.has(ORG_ADMIN));

    // Reads: org.read or org.admin.
    let get_user = |p: &Principal| env.api.get_user(req(p, GetUserRequest { id: sam.id.clone() }));
    get_user(&exec).await.expect("org.read reads");
    let denied = get_user(&salesperson).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains(ORG_READ), "{}", denied.message());
    assert_eq!(
        env.api.list_roles(req(&salesperson, ListRolesRequest::default())).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    env.api.list_departments(req(&exec, ListDepartmentsRequest::default())).await.expect("org.read lists");
    env.api.list_service_accounts(req(&exec, ListServiceAccountsRequest::default())).await.expect("org.read lists");

    // Changes, the audit and keys: org.admin only.
    let denied = [
        env.api
            .create_department(req(
                &exec,
                CreateDepartmentRequest { department: Some(Department { name: "X".into(), ..Default::default() }) },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        try_create_user_as(&env, &exec).await.unwrap_err(),
        env.api
            .update_user(req(
                &salesperson,
                UpdateUserRequest {
                    user: Some(User { id: sam.id.clone(), role_ids: vec![executive.clone()], ..Default::default() }),
                    update_mask: mask(&["role_ids"]),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
        env.api.list_security_events(req(&exec, ListSecurityEventsRequest::default())).await.map(|_| ()).unwrap_err(),
        env.api.rotate_signing_key(req(&exec, RotateSigningKeyRequest {})).await.map(|_| ()).unwrap_err(),
        env.api
            .delete_role(req(&exec, DeleteRoleRequest { id: rep.clone(), etag: String::new() }))
            .await
            .map(|_| ())
            .unwrap_err(),
        env.api
            .create_service_account(req(
                &exec,
                CreateServiceAccountRequest {
                    service_account: Some(ServiceAccount { name: "x".into(), ..Default::default() }),
                },
            ))
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(ORG_ADMIN));
    }

    // Without a principal (the authentication layer let nothing through): UNAUTHENTICATED.
    let anonymous = env.api.get_user(Request::new(GetUserRequest { id: sam.id.clone() })).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert_eq!(env.api.get_me(Request::new(GetMeRequest {})).await.unwrap_err().code(), Code::Unauthenticated);
    // Anyone signed in resolves their own visibility and reads the public keys.
    visibility(&env, &salesperson).await.expect("any caller");
    assert!(!env.api.get_jwks(Request::new(GetJwksRequest {})).await.unwrap().into_inner().keys.is_empty());
}

pub async fn try_create_user_as(env: &Env, principal: &Principal) -> Result<(), Status> {
    let user = User { email: "new@example.com".into(), display_name: "New".into(), ..Default::default() };
    env.api
        .create_user(req(principal, CreateUserRequest { user: Some(user), password: PASSWORD.into() }))
        .await
        .map(|_| ())
}

pub async fn security_events_are_listed_and_filtered(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let team = create_department(&env, "Team", &office.id).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", &office.id, &[]).await;
    update_user(
        &env,
        User { id: sam.id.clone(), department_id: team.id.clone(), role_ids: vec![rep.clone()], ..Default::default() },
        &["department_id", "role_ids"],
    )
    .await
    .unwrap();
    let mut request = Request::new(SignInRequest { email: "sam@example.com".into(), password: PASSWORD.into() });
    request.metadata_mut().insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
    env.api.sign_in(request).await.unwrap();

    let all = events(&env, "").await;
    let kinds: Vec<&str> = all.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sign_in",
            "user_department_changed",
            "user_roles_changed",
            "user_created",
            "department_created",
            "sign_in",
            "organisation_bootstrapped"
        ],
        "newest first"
    );
    assert_eq!(all[0].client_address, "203.0.113.7");
    assert_eq!(all[0].user_id, sam.id);
    assert!(all.iter().all(|e| !e.id.is_empty() && e.time.is_some()));
    let micros = |e: &SecurityEvent| crm_kit::time::from_timestamp(e.time.as_ref().unwrap());
    assert!(all.windows(2).all(|w| micros(&w[0]) >= micros(&w[1])));
    assert_eq!(all[1].detail, format!("department {:?} -> {:?}", office.id, team.id));
    assert_eq!(all[2].detail, "roles [] -> [Salesperson]");
    assert!(all[1..5].iter().all(|e| e.actor_id == env.admin.subject));

    // Paging one at a time walks the same list.
    let mut walked = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .api
            .list_security_events(req(
                &env.admin,
                ListSecurityEventsRequest { page_size: 2, page_token: token.clone(), filter: String::new() },
            ))
            .await
            .unwrap()
            .into_inner();
        walked.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(walked, all);

    let sams = events(&env, &format!("user_id = \"{}\" AND NOT type = sign_in", sam.id)).await;
    assert_eq!(sams.len(), 3);
    let by_admin = events(&env, &format!("actor_id = \"{}\"", env.admin.subject)).await;
    assert_eq!(by_admin.len(), 5);
    let bad = env
        .api
        .list_security_events(req(
            &env.admin,
            ListSecurityEventsRequest { filter: "severity = high".into(), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&bad), ["filter"]);
}

pub async fn validation_errors_name_fields(db: TestDb) {
    let env = env(db).await;
    let user = User { email: "not-an-email".into(), department_id: "nope".into(), ..Default::default() };
    let err = env
        .api
        .create_user(req(&env.admin, CreateUserRequest { user: Some(user), password: "short".into() }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["user.email", "user.display_name", "user.department_id", "password"]);
    let long = env
        .api
        .create_user(req(
            &env.admin,
            CreateUserRequest {
                user: Some(User { email: "a@example.com".into(), display_name: "A".into(), ..Default::default() }),
                password: "x".repeat(1025),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&long), ["password"]);
    let missing = env.api.create_user(req(&env.admin, CreateUserRequest::default())).await.unwrap_err();
    assert_eq!(fields(&missing), ["user"]);

    let role = Role { name: " ".into(), permissions: vec!["contacts.delete".into()], ..Default::default() };
    let err = env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(role) })).await.unwrap_err();
    assert_eq!(fields(&err), ["role.name", "role.permissions[0]", "role.data_scope"]);
    let bad = err.get_details_bad_request().unwrap();
    assert!(bad.field_violations[1].description.contains("contacts.read"), "lists the valid permissions");

    let department = Department { name: "x".repeat(201), ..Default::default() };
    let err = env
        .api
        .create_department(req(&env.admin, CreateDepartmentRequest { department: Some(department) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["department.name"]);

    let err = env
        .api
        .update_user(req(
            &env.admin,
            UpdateUserRequest {
                user: Some(User { id: env.admin.subject.clone(), ..Default::default() }),
                update_mask: mask(&["password_hash"]),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["update_mask"]);
    let err = env
        .api
        .update_role(req(
            &env.admin,
            UpdateRoleRequest { role: Some(Role { id: "x".into(), ..Default::default() }), update_mask: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["role.id"]);
    let err = env.api.get_department(req(&env.admin, GetDepartmentRequest { id: "12".into() })).await.unwrap_err();
    assert_eq!(fields(&err), ["id"]);
    let err = env
        .api
        .list_users(req(&env.admin, ListUsersRequest { page_size: -1, ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["page_size"]);
    let account = ServiceAccount { name: String::new(), role_ids: vec!["x".into()], ..Default::default() };
    let err = env
        .api
        .create_service_account(req(&env.admin, CreateServiceAccountRequest { service_account: Some(account) }))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["service_account.name", "service_account.role_ids[0]"]);
}
