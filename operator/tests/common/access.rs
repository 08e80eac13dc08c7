//! Acting as a ServiceAccount in the API-server tests: minting its token, and asking the API
//! server what a client may do.
#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::config::AuthInfo;

/// A fresh token of ServiceAccount `name` in `ns`, as the user-info of a kubeconfig.
pub async fn service_account_auth(admin: &Client, ns: &str, name: &str, seconds: i64) -> AuthInfo {
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(
            name,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec { expiration_seconds: Some(seconds), ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .expect("TokenRequest")
        .status
        .expect("token")
        .token;
    serde_json::from_value(serde_json::json!({"token": token})).expect("auth")
}

/// Whether `client` may `verb` `group`/`resource` in `ns`, by a SelfSubjectAccessReview.
pub async fn allowed(client: &Client, ns: &str, group: &str, resource: &str, verb: &str) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                resource: Some(resource.into()),
                verb: Some(verb.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let got = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    got.status.is_some_and(|s| s.allowed)
}
