//! The role served over gRPC, as `crm serve auth` runs it, with its authentication layer.

use crm_kit::role::{Entry, Role, Suite};
use crm_kit::testing::Surroundings;

use super::*;

/// The suite the auth service is served in here: itself and the contacts service, whose
/// permissions it offers.
static ROLES: &[&dyn Role] = &[&Entry::<crm_auth::Auth>::NEW, &Entry::<crm_contacts::Contacts>::NEW];

fn args() -> crm_auth::AuthArgs {
    crm_auth::AuthArgs {
        access_token_ttl: policy().access_token_ttl,
        refresh_token_ttl: policy().refresh_token_ttl,
        max_failed_sign_ins: policy().max_failed_sign_ins,
        lockout: policy().lockout,
        refresh_reuse_grace: policy().refresh_reuse_grace,
        admin_email: ADMIN_EMAIL.into(),
    }
}

pub async fn served_over_grpc_with_authentication(db: TestDb) {
    use crm_proto::auth::v1::auth_service_client::AuthServiceClient;
    use crm_proto::auth::v1::org_service_client::OrgServiceClient;

    let store = Store::open(db.url(), 4).await.unwrap();
    crm_auth::bootstrap(&store, &catalog(), ADMIN_EMAIL, Some(ADMIN_PASSWORD.into())).await.unwrap();
    store.db().close().await;
    let around = Surroundings { suite: Suite::new(ROLES), callees: Vec::new(), credentials: None };
    let app = crm_kit::testing::spawn::<crm_auth::Auth>(args(), Some(db), around).await;

    let channel = app.channel();
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut org = OrgServiceClient::new(channel);
    let pair = auth
        .sign_in(SignInRequest { email: ADMIN_EMAIL.into(), password: ADMIN_PASSWORD.into() })
        .await
        .expect("SignIn needs no token")
        .into_inner();
    auth.get_jwks(GetJwksRequest {}).await.expect("GetJwks needs no token");

    let anonymous = org.list_users(ListUsersRequest::default()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let mut forged = Request::new(GetMeRequest {});
    forged.metadata_mut().insert("authorization", "Bearer not.a.token".parse().unwrap());
    assert_eq!(auth.get_me(forged).await.unwrap_err().code(), Code::Unauthenticated);

    let bearer = format!("Bearer {}", pair.access_token);
    let mut request = Request::new(GetMeRequest {});
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    let me = auth.get_me(request).await.expect("authenticated").into_inner();
    assert_eq!(me.email, ADMIN_EMAIL);
    let mut request = Request::new(ListUsersRequest::default());
    request.metadata_mut().insert("authorization", bearer.parse().unwrap());
    assert_eq!(org.list_users(request).await.unwrap().into_inner().users.len(), 1);
    let next = auth.refresh(RefreshRequest { refresh_token: pair.refresh_token }).await.unwrap().into_inner();
    auth.sign_out(SignOutRequest { refresh_token: next.refresh_token }).await.expect("SignOut needs no token");

    app.stop().await.expect("serves until shutdown");
}
