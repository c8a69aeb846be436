//! The first start: the starting organisation, the signing key, the suite's service account.

use super::*;

pub async fn bootstrap_runs_once_even_when_raced(db: TestDb) {
    let (a, b) = (Store::open(db.url(), 4).await.unwrap(), Store::open(db.url(), 4).await.unwrap());
    let catalog = catalog();
    let (x, y) = tokio::join!(
        crm_auth::bootstrap(&a, &catalog, " Boss@Example.com ", None),
        crm_auth::bootstrap(&b, &catalog, "boss@example.com", None)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(u8::from(x.created) + u8::from(y.created), 1, "exactly one replica creates the organisation");
    let created = if x.created { x } else { y };
    assert_eq!(created.email, "boss@example.com");
    let password = created.generated_password.clone().expect("a generated password");
    assert_eq!(password.chars().count(), 20);
    let notice = crm_auth::generated_password_notice(&created).unwrap();
    assert!(notice.contains(&password) && notice.contains("boss@example.com"));

    let again = crm_auth::bootstrap(&a, &catalog, "other@example.com", Some("another password".into())).await.unwrap();
    assert!(!again.created && again.generated_password.is_none());
    assert!(crm_auth::bootstrap(&a, &catalog, "not an address", None).await.is_err());

    // Two replicas starting at once agree on one signing key.
    let (k1, k2) = tokio::join!(KeyRing::open(a.clone()), KeyRing::open(b.clone()));
    assert_eq!(k1.unwrap().current().await.unwrap().kid(), k2.unwrap().current().await.unwrap().kid());
    assert_eq!(a.published_keys(i64::MAX).await.unwrap().len(), 1);

    let api = api_over(&a).await;
    let pair = sign_in(&api, "BOSS@example.com", &password).await.expect("the administrator signs in");
    let admin = api.verifier().verify(&pair.access_token).await.unwrap();
    assert_eq!(admin.permissions, PERMISSIONS);
    assert_eq!(admin.name, "Administrator");

    let roles = api.list_roles(req(&admin, ListRolesRequest::default())).await.unwrap().into_inner().roles;
    let summary: Vec<(String, Vec<String>, i32)> =
        roles.into_iter().map(|r| (r.name, r.permissions, r.data_scope)).collect();
    let strings = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        summary,
        vec![
            (ADMINISTRATOR.into(), strings(PERMISSIONS), DataScope::All as i32),
            (EXECUTIVE.into(), strings(&[CONTACTS_READ, CONTACTS_WRITE, ORG_READ]), DataScope::All as i32),
            (
                HEAD_OF_DEPARTMENT.into(),
                strings(&[CONTACTS_READ, CONTACTS_WRITE, ORG_READ]),
                DataScope::DepartmentTree as i32
            ),
            (SALESPERSON.into(), strings(&[CONTACTS_READ, CONTACTS_WRITE]), DataScope::Own as i32),
        ]
    );
    let departments =
        api.list_departments(req(&admin, ListDepartmentsRequest::default())).await.unwrap().into_inner().departments;
    assert_eq!(departments.len(), 1);
    assert_eq!(departments[0].name, HEAD_OFFICE);
    assert_eq!(admin.department_id, departments[0].id);
}

pub async fn the_suite_service_account_is_made_sure_of_at_every_start(db: TestDb) {
    use crm_auth::bootstrap::{SUITE_SERVICES, ensure_suite_account};
    use crm_auth::store::SuiteAccount;
    use crm_kit::auth::ServiceCredentials;

    let env = env(db).await;
    let issue = |c: &ServiceCredentials| {
        let request = IssueServiceTokenRequest { client_id: c.client_id().into(), client_secret: c.secret().into() };
        env.api.issue_service_token(Request::new(request))
    };
    let first = ServiceCredentials::generate("crm-services");
    // Two replicas starting at once: one account.
    let other = Store::open(env._db.url(), 2).await.unwrap();
    let catalog = catalog();
    let (a, b) = tokio::join!(
        ensure_suite_account(&env.store, &catalog, &first),
        ensure_suite_account(&other, &catalog, &first)
    );
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, [SuiteAccount::Created, SuiteAccount::Unchanged]);
    let pair = issue(&first).await.expect("the suite's account gets tokens").into_inner();
    let service = env.verifier.verify(&pair.access_token).await.unwrap();
    assert!(service.service_account);
    // What services need of each other: every permission but administration.
    assert_eq!(service.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);
    let visibility = visibility(&env, &service).await.unwrap();
    assert!(visibility.all, "the suite's account sees every record: {visibility:?}");

    // A new secret (a rotated Secret) replaces the old one at the next start.
    let rotated = ServiceCredentials::new("crm-services", &format!("{}-rotated", first.secret())).unwrap();
    assert_eq!(ensure_suite_account(&env.store, &catalog, &rotated).await.unwrap(), SuiteAccount::Updated);
    assert_eq!(issue(&first).await.unwrap_err().code(), Code::Unauthenticated);
    issue(&rotated).await.expect("the new secret works");
    assert_eq!(ensure_suite_account(&env.store, &catalog, &rotated).await.unwrap(), SuiteAccount::Unchanged);

    // An administrator who strips its role finds it restored at the next start.
    let role = role_id(&env, SUITE_SERVICES).await;
    let role = env.api.get_role(req(&env.admin, GetRoleRequest { id: role })).await.unwrap().into_inner();
    let patch = Role { permissions: vec![CONTACTS_READ.into()], ..role.clone() };
    env.api
        .update_role(req(&env.admin, UpdateRoleRequest { role: Some(patch), update_mask: mask(&["permissions"]) }))
        .await
        .unwrap();
    assert_eq!(ensure_suite_account(&env.store, &catalog, &rotated).await.unwrap(), SuiteAccount::Updated);
    let restored = env.api.get_role(req(&env.admin, GetRoleRequest { id: role.id })).await.unwrap().into_inner();
    assert_eq!(restored.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);
    let kinds: Vec<String> = events(&env, "").await.into_iter().map(|e| e.r#type).collect();
    for kind in ["service_account_created", "service_account_secret_changed", "role_changed"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} is audited: {kinds:?}");
    }
}
