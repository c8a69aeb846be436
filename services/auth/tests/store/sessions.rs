//! Sign-in, lock-out, refresh tokens, sign-out, service tokens, passwords and signing keys.

use super::*;

pub async fn sign_in_fails_uniformly_and_locks_out(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = role_id(&env, SALESPERSON).await;
    let anna = create_user(&env, "Anna@Example.com", "Anna", &office.id, &[&sales]).await;

    let pair = sign_in(&env.api, "  ANNA@example.com ", PASSWORD).await.expect("e-mail is normalised");
    assert_eq!(pair.token_type, "Bearer");
    assert!(!pair.refresh_token.is_empty());
    let access_expiry = pair.access_token_expire_time.unwrap().seconds;
    let refresh_expiry = pair.refresh_token_expire_time.unwrap().seconds;
    assert!(access_expiry < refresh_expiry);
    let principal = env.verifier.verify(&pair.access_token).await.unwrap();
    assert_eq!(principal.subject, anna.id);
    assert!(!principal.service_account);
    assert_eq!((principal.email.as_str(), principal.name.as_str()), ("anna@example.com", "Anna"));
    assert_eq!(principal.department_id, office.id);
    assert_eq!(principal.permissions, [CONTACTS_READ, CONTACTS_WRITE]);

    let unknown = sign_in(&env.api, "nobody@example.com", PASSWORD).await.unwrap_err();
    let wrong = sign_in(&env.api, "anna@example.com", "not the password").await.unwrap_err();
    let empty = sign_in(&env.api, "", "").await.unwrap_err();
    for status in [&unknown, &wrong, &empty] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), unknown.message(), "one answer for every failure");
    }

    // max_failed_sign_ins = 3: the third consecutive failure locks (the one above counted).
    for _ in 0..2 {
        sign_in(&env.api, "anna@example.com", "still wrong!").await.unwrap_err();
    }
    let locked = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap_err();
    assert_eq!((locked.code(), locked.message()), (Code::Unauthenticated, unknown.message()));
    tokio::time::sleep(LOCKOUT + Duration::from_millis(200)).await;
    sign_in(&env.api, "anna@example.com", PASSWORD).await.expect("the lock-out is over");

    // A success resets the count: two failures do not lock.
    for _ in 0..2 {
        sign_in(&env.api, "anna@example.com", "wrong again").await.unwrap_err();
    }
    sign_in(&env.api, "anna@example.com", PASSWORD).await.expect("not locked");

    let failed = events(&env, "type = sign_in_failed").await;
    assert!(failed.iter().any(|e| e.email == "nobody@example.com" && e.user_id.is_empty()));
    assert!(failed.iter().any(|e| e.user_id == anna.id && e.detail == "wrong password"));
    assert!(failed.iter().any(|e| e.user_id == anna.id && e.detail == "the account is locked"));
    let locked_out = events(&env, "type = locked_out").await;
    assert_eq!(locked_out.len(), 1);
    assert_eq!(locked_out[0].user_id, anna.id);
    let signed_in = events(&env, &format!("type = sign_in AND user_id = \"{}\"", anna.id)).await;
    assert_eq!(signed_in.len(), 3);
    assert_eq!(signed_in[0].actor_id, anna.id);
}

pub async fn refresh_rotates_and_reuse_revokes_the_family(db: TestDb) {
    let env = env(db).await;
    let office = head_office(&env).await;
    let sales = role_id(&env, SALESPERSON).await;
    let executive = role_id(&env, EXECUTIVE).await;
    let anna = create_user(&env, "anna@example.com", "Anna", &office.id, &[&sales]).await;

    let first = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap();
    let second = refresh(&env.api, &first.refresh_token).await.expect("exchanged");
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    let principal = env.verifier.verify(&second.access_token).await.unwrap();
    assert_eq!(principal.subject, anna.id);

    // The new pair carries the user's roles as they are now.
    let mut patch = User { id: anna.id.clone(), role_ids: vec![executive.clone()], ..Default::default() };
    patch.etag = String::new();
    update_user(&env, patch, &["role_ids"]).await.unwrap();
    let third = refresh(&env.api, &second.refresh_token).await.expect("exchanged again");
    let principal = env.verifier.verify(&third.access_token).await.unwrap();
    assert_eq!(principal.permissions, [CONTACTS_READ, CONTACTS_WRITE, ORG_READ]);

    // Presenting a used-up token revokes the whole sign-in, the newest token included.
    let reused = refresh(&env.api, &first.refresh_token).await.unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated);
    let newest = refresh(&env.api, &third.refresh_token).await.unwrap_err();
    assert_eq!(newest.code(), Code::Unauthenticated);
    assert_eq!(newest.message(), reused.message());
    let reuse = events(&env, "type = refresh_reuse").await;
    assert_eq!(reuse.len(), 1);
    assert_eq!(reuse[0].user_id, anna.id);

    // Other sign-ins of the same user are untouched.
    let other = sign_in(&env.api, "anna@example.com", PASSWORD).await.unwrap();
    refresh(&env.api, &other.refresh_token).await.expect("a separate sign-in");

    // Expired tokens are purged; a purged token is simply unknown.
    let later = crm_kit::time::now_micros() + 2 * 3600 * 1_000_000;
    assert!(env.store.purge_expired(later).await.unwrap() > 0);
    assert_eq!(refresh(&env.api, &other.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);

    for junk in ["", "junk", &"x".repeat(5000)] {
        let status = refresh(&env.api, junk).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Unauthenticated, reused.message()));
    }
}

pub async fn concurrent_refreshes_share_one_successor(db: TestDb) {
    let env = env(db).await;
    for _ in 0..3 {
        // Ten tabs refresh with the same token at once: all get the same successor, nobody is
        // signed out, and the successor works once like any refresh token.
        let pair = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
        let tabs: Vec<_> = (0..10)
            .map(|_| {
                let (api, token) = (env.api.clone(), pair.refresh_token.clone());
                tokio::spawn(async move { refresh(&api, &token).await })
            })
            .collect();
        let mut successors = std::collections::BTreeSet::new();
        for tab in tabs {
            let next = tab.await.unwrap().expect("every tab keeps the sign-in");
            env.verifier.verify(&next.access_token).await.expect("a valid access token");
            successors.insert(next.refresh_token);
        }
        assert_eq!(successors.len(), 1, "one successor for all tabs");
        let successor = successors.into_iter().next().unwrap();
        let after = refresh(&env.api, &successor).await.expect("the successor exchanges");
        // The first token again: its successor is used now, so this is a theft — the sign-in
        // goes, the newest token with it.
        assert_eq!(refresh(&env.api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(refresh(&env.api, &after.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(events(&env, "type = refresh_reuse").await.len(), 3);
}

pub async fn reuse_after_the_grace_revokes(db: TestDb) {
    let env = env(db).await;
    let policy = Policy { refresh_reuse_grace: Duration::from_millis(300), ..policy() };
    let keys = crm_auth::keys::KeyRing::open(env.store.clone()).await.unwrap();
    let api = AuthApi::new(env.store.clone(), keys, policy, catalog());
    let pair = sign_in(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let next = refresh(&api, &pair.refresh_token).await.unwrap();
    assert_eq!(refresh(&api, &pair.refresh_token).await.unwrap().refresh_token, next.refresh_token, "within the grace");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(refresh(&api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated, "after it");
    assert_eq!(
        refresh(&api, &next.refresh_token).await.unwrap_err().code(),
        Code::Unauthenticated,
        "the sign-in is gone"
    );
    // With the grace off, a second presentation is a theft at once.
    let policy = Policy { refresh_reuse_grace: Duration::ZERO, ..policy };
    let keys = crm_auth::keys::KeyRing::open(env.store.clone()).await.unwrap();
    let api = AuthApi::new(env.store.clone(), keys, policy, catalog());
    let pair = sign_in(&api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let next = refresh(&api, &pair.refresh_token).await.unwrap();
    assert_eq!(refresh(&api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(refresh(&api, &next.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
}

pub async fn sign_out_revokes_the_sign_in(db: TestDb) {
    let env = env(db).await;
    let pair = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let next = refresh(&env.api, &pair.refresh_token).await.unwrap();
    // Signing out with an older token of the sign-in revokes the newer ones too.
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: pair.refresh_token.clone() })).await.unwrap();
    assert_eq!(refresh(&env.api, &next.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    // Unknown tokens are fine and tell nothing.
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: "never issued".into() })).await.unwrap();
    env.api.sign_out(Request::new(SignOutRequest { refresh_token: String::new() })).await.unwrap();
    let signed_out = events(&env, "type = sign_out").await;
    assert_eq!(signed_out.len(), 1);
    assert_eq!(signed_out[0].user_id, env.admin.subject);
}

pub async fn service_accounts_get_tokens(db: TestDb) {
    let env = env(db).await;
    let reader = Role {
        name: "Integration".into(),
        permissions: vec![CONTACTS_READ.into()],
        data_scope: DataScope::All as i32,
        ..Default::default()
    };
    let reader =
        env.api.create_role(req(&env.admin, CreateRoleRequest { role: Some(reader) })).await.unwrap().into_inner();
    let sales = role_id(&env, SALESPERSON).await;
    let create = |name: &str, role: &str| {
        let account = ServiceAccount { name: name.into(), role_ids: vec![role.into()], ..Default::default() };
        env.api.create_service_account(req(&env.admin, CreateServiceAccountRequest { service_account: Some(account) }))
    };
    let created = create("deals sync", &reader.id).await.unwrap().into_inner();
    let account = created.service_account.unwrap();
    assert!(account.client_id.starts_with("svc-"));
    assert_eq!(created.client_secret.len(), 43);
    assert_eq!(account.role_ids, vec![reader.id.clone()]);
    let narrow = create("reports", &sales).await.unwrap().into_inner();

    let issue = |client_id: &str, secret: &str| {
        env.api.issue_service_token(Request::new(IssueServiceTokenRequest {
            client_id: client_id.into(),
            client_secret: secret.into(),
        }))
    };
    let pair = issue(&account.client_id, &created.client_secret).await.unwrap().into_inner();
    assert!(pair.refresh_token.is_empty() && pair.refresh_token_expire_time.is_none());
    let principal = env.verifier.verify(&pair.access_token).await.unwrap();
    assert!(principal.service_account);
    assert_eq!(principal.subject, account.id);
    assert_eq!(principal.name, "deals sync");
    assert_eq!(principal.permissions, [CONTACTS_READ]);
    let seen = visibility(&env, &principal).await.unwrap();
    assert!(seen.all);
    let me = env.api.get_me(req(&principal, GetMeRequest {})).await.unwrap().into_inner();
    assert!(me.service_account);
    assert_eq!(me.data_scope, DataScope::All as i32);

    let narrow_account = narrow.service_account.unwrap();
    let narrow_pair = issue(&narrow_account.client_id, &narrow.client_secret).await.unwrap().into_inner();
    let narrow_principal = env.verifier.verify(&narrow_pair.access_token).await.unwrap();
    let seen = visibility(&env, &narrow_principal).await.unwrap();
    assert!(!seen.all);
    assert_eq!(seen.owner_ids, vec![narrow_account.id.clone()]);

    let wrong_secret = issue(&account.client_id, &narrow.client_secret).await.unwrap_err();
    let unknown = issue("svc-unknown", &created.client_secret).await.unwrap_err();
    let empty = issue("", "").await.unwrap_err();
    for status in [&wrong_secret, &unknown, &empty] {
        assert_eq!((status.code(), status.message()), (Code::Unauthenticated, wrong_secret.message()));
    }

    let listed = env
        .api
        .list_service_accounts(req(&env.admin, ListServiceAccountsRequest { page_size: 1, ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.service_accounts.len(), 1);
    assert_eq!(listed.service_accounts[0].name, "deals sync");
    let rest = env
        .api
        .list_service_accounts(req(
            &env.admin,
            ListServiceAccountsRequest { page_size: 1, page_token: listed.next_page_token },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.service_accounts[0].name, "reports");
    assert!(rest.next_page_token.is_empty());

    env.api
        .delete_service_account(req(&env.admin, DeleteServiceAccountRequest { id: account.id.clone() }))
        .await
        .unwrap();
    let gone = issue(&account.client_id, &created.client_secret).await.unwrap_err();
    assert_eq!(gone.code(), Code::Unauthenticated);
    // Tokens already issued expire on their own, but the deleted account is no longer anyone.
    assert_eq!(visibility(&env, &principal).await.unwrap_err().code(), Code::Unauthenticated);
    let deleted = env
        .api
        .delete_service_account(req(&env.admin, DeleteServiceAccountRequest { id: account.id.clone() }))
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::NotFound);

    assert_eq!(events(&env, "type = service_account_created").await.len(), 2);
    assert_eq!(events(&env, "type = service_account_deleted").await.len(), 1);
    assert_eq!(events(&env, &format!("type = service_token_issued AND actor_id = \"{}\"", account.id)).await.len(), 1);
    assert_eq!(events(&env, "type = service_token_failed").await.len(), 4);
}

pub async fn passwords_change_and_revoke_sessions(db: TestDb) {
    let env = env(db).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", "", &[&rep]).await;
    let other = create_user(&env, "kim@example.com", "Kim", "", &[&rep]).await;
    let pair = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap();
    let me = env.verifier.verify(&pair.access_token).await.unwrap();
    let set = |p: &Principal, user_id: &str, current: &str, new: &str| {
        env.api.set_password(req(
            p,
            SetPasswordRequest { user_id: user_id.into(), current_password: current.into(), new_password: new.into() },
        ))
    };

    let denied = set(&me, &other.id, PASSWORD, "a brand new password").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(fields(&set(&me, &sam.id, "", "a brand new password").await.unwrap_err()), ["current_password"]);
    assert_eq!(fields(&set(&me, &sam.id, PASSWORD, "short").await.unwrap_err()), ["new_password"]);
    assert_eq!(
        fields(&set(&me, &sam.id, "not my password", "a brand new password").await.unwrap_err()),
        ["current_password"]
    );

    set(&me, &sam.id, PASSWORD, "a brand new password").await.expect("own password with the current one");
    assert_eq!(sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let fresh = sign_in(&env.api, "sam@example.com", "a brand new password").await.expect("the new password");
    assert_eq!(refresh(&env.api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated, "revoked");

    // Administrators set anyone's password without the current one.
    set(&env.admin, &sam.id, "", "set by the administrator").await.unwrap();
    assert_eq!(refresh(&env.api, &fresh.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    sign_in(&env.api, "sam@example.com", "set by the administrator").await.unwrap();
    let missing = set(&env.admin, &crm_kit::id::new(), "", "whatever password").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let changed = events(&env, "type = password_changed").await;
    assert_eq!(changed.len(), 2);
    assert_eq!(
        (changed[0].actor_id.as_str(), changed[0].user_id.as_str()),
        (env.admin.subject.as_str(), sam.id.as_str())
    );
    assert_eq!((changed[1].actor_id.as_str(), changed[1].user_id.as_str()), (sam.id.as_str(), sam.id.as_str()));
    assert_eq!(events(&env, "type = password_change_failed").await.len(), 1);
}

pub async fn deactivation_revokes_sessions(db: TestDb) {
    let env = env(db).await;
    let rep = role_id(&env, SALESPERSON).await;
    let sam = create_user(&env, "sam@example.com", "Sam", "", &[&rep]).await;
    let pair = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap();
    let wrong = sign_in(&env.api, "sam@example.com", "wrong password").await.unwrap_err();
    update_user(&env, User { id: sam.id.clone(), ..Default::default() }, &["active"]).await.unwrap();
    assert_eq!(refresh(&env.api, &pair.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let inactive = sign_in(&env.api, "sam@example.com", PASSWORD).await.unwrap_err();
    assert_eq!((inactive.code(), inactive.message()), (Code::Unauthenticated, wrong.message()));
    let deactivated = events(&env, "type = user_deactivated").await;
    assert_eq!(deactivated.len(), 1);
    assert_eq!(deactivated[0].detail, "1 sign-in(s) revoked");

    update_user(&env, User { id: sam.id.clone(), active: true, ..Default::default() }, &["active"]).await.unwrap();
    sign_in(&env.api, "sam@example.com", PASSWORD).await.expect("reactivated");
    assert_eq!(events(&env, "type = user_reactivated").await.len(), 1);

    let myself = User { id: env.admin.subject.clone(), ..Default::default() };
    assert_eq!(update_user(&env, myself, &["active"]).await.unwrap_err().code(), Code::FailedPrecondition);
}

pub async fn key_rotation_keeps_old_tokens_valid(db: TestDb) {
    let env = env(db).await;
    let replica = KeyRing::open(env.store.clone()).await.unwrap();
    let before = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    let old_kid = kid_of(&before.access_token);
    let jwk = env.api.rotate_signing_key(req(&env.admin, RotateSigningKeyRequest {})).await.unwrap().into_inner();
    assert_ne!(jwk.kid, old_kid);
    assert_eq!(
        (jwk.kty.as_str(), jwk.crv.as_str(), jwk.alg.as_str(), jwk.r#use.as_str()),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );

    let published = env.api.get_jwks(Request::new(GetJwksRequest {})).await.unwrap().into_inner();
    let kids: Vec<&str> = published.keys.iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, [jwk.kid.as_str(), old_kid.as_str()], "the retired key stays published");

    let after = sign_in(&env.api, ADMIN_EMAIL, ADMIN_PASSWORD).await.unwrap();
    assert_eq!(kid_of(&after.access_token), jwk.kid, "new tokens carry the new key");
    env.verifier.verify(&before.access_token).await.expect("the old token still verifies");
    env.verifier.verify(&after.access_token).await.expect("the new token verifies");
    // A fresh verifier (another service) verifies both too.
    let fresh = Verifier::new(std::sync::Arc::new(StoreKeys::new(env.store.clone(), policy().access_token_ttl)));
    fresh.verify(&before.access_token).await.unwrap();
    fresh.verify(&after.access_token).await.unwrap();

    // Another replica picks the new key up when it reloads.
    assert_eq!(replica.reload().await.unwrap().kid(), jwk.kid);
    let rotations = events(&env, "type = key_rotated").await;
    assert_eq!(rotations.len(), 1);
    assert!(rotations[0].detail.contains(&old_kid) && rotations[0].detail.contains(&jwk.kid));
    // Keys retired longer ago than tokens live are no longer published.
    assert_eq!(env.store.published_keys(crm_kit::time::now_micros()).await.unwrap().len(), 1);
}
