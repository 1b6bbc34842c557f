//! Request and response bodies of OpenFGA's HTTP API, as plain serde types.

use serde::{Deserialize, Serialize};

use crate::tuple::TupleKey;

/// A JSON object, as used for condition contexts and check contexts.
pub type Context = serde_json::Map<String, serde_json::Value>;

/// How fresh a check or read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Let the server pick (it uses `MINIMIZE_LATENCY`).
    #[default]
    #[serde(rename = "UNSPECIFIED")]
    Unspecified,
    /// Answers may come from the server's check cache.
    #[serde(rename = "MINIMIZE_LATENCY")]
    MinimizeLatency,
    /// Bypass the server's caches.
    #[serde(rename = "HIGHER_CONSISTENCY")]
    HigherConsistency,
}

impl Consistency {
    fn is_unspecified(&self) -> bool {
        *self == Consistency::Unspecified
    }
}

/// What the server does when a write names a tuple that already exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDuplicate {
    /// Fail the whole request (OpenFGA's default).
    #[default]
    Error,
    /// Treat it as done, so replays are harmless.
    Ignore,
}

/// What the server does when a delete names a tuple that does not exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Fail the whole request (OpenFGA's default).
    #[default]
    Error,
    /// Treat it as done, so replays are harmless.
    Ignore,
}

/// One Write request: tuples to write and tuples to delete, applied together
/// or not at all.
#[derive(Clone, Debug, Default)]
pub struct WriteRequest {
    /// Tuples to write.
    pub writes: Vec<TupleKey>,
    /// Tuples to delete (their conditions are ignored).
    pub deletes: Vec<TupleKey>,
    /// Pin the request to a model; `None` uses the store's latest.
    pub authorization_model_id: Option<String>,
    /// What to do with writes that already exist.
    pub on_duplicate: OnDuplicate,
    /// What to do with deletes that do not exist.
    pub on_missing: OnMissing,
}

impl WriteRequest {
    /// Writes and deletes with both "ignore" options set, so that replaying
    /// the request after a lost response changes nothing.
    pub fn idempotent(writes: Vec<TupleKey>, deletes: Vec<TupleKey>) -> Self {
        WriteRequest {
            writes,
            deletes,
            authorization_model_id: None,
            on_duplicate: OnDuplicate::Ignore,
            on_missing: OnMissing::Ignore,
        }
    }

    /// How many tuples the request carries.
    pub fn len(&self) -> usize {
        self.writes.len() + self.deletes.len()
    }

    /// Whether the request carries no tuple.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Serialize)]
pub(crate) struct WriteBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<WriteSection<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletes: Option<DeleteSection<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_model_id: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct WriteSection<'a> {
    pub tuple_keys: Vec<WriteKey<'a>>,
    pub on_duplicate: OnDuplicate,
}

/// A tuple to write, as OpenFGA is sent it.
#[derive(Serialize)]
pub(crate) struct WriteKey<'a> {
    pub user: &'a str,
    pub relation: &'a str,
    pub object: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<WriteCondition<'a>>,
}

/// A written tuple's condition, its context always sent (`{}` when it has
/// none): OpenFGA's SQL datastores read a stored tuple's context back as
/// an empty struct and compare the one written with it as protobufs, where
/// none and empty differ. A conditioned tuple written again without one was
/// refused as existing "with a different condition" (a 409). (OpenFGA's
/// memory datastore keeps a context as written and compares its text: there
/// a tuple another client wrote without one conflicts with this instead;
/// production runs a SQL datastore.)
#[derive(Serialize)]
pub(crate) struct WriteCondition<'a> {
    pub name: &'a str,
    #[serde(serialize_with = "context_or_empty")]
    pub context: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

fn context_or_empty<S: serde::Serializer>(
    context: &Option<&serde_json::Map<String, serde_json::Value>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match context {
        Some(c) => c.serialize(s),
        None => serde_json::Map::new().serialize(s),
    }
}

impl<'a> From<&'a TupleKey> for WriteKey<'a> {
    fn from(t: &'a TupleKey) -> Self {
        WriteKey {
            user: &t.user,
            relation: &t.relation,
            object: &t.object,
            condition: t.condition.as_ref().map(|c| WriteCondition {
                name: &c.name,
                context: c.context.as_ref(),
            }),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct DeleteSection<'a> {
    pub tuple_keys: Vec<KeyOnly<'a>>,
    pub on_missing: OnMissing,
}

/// A tuple key without its condition: deletes and check keys take no condition.
#[derive(Serialize)]
pub(crate) struct KeyOnly<'a> {
    pub user: &'a str,
    pub relation: &'a str,
    pub object: &'a str,
}

impl<'a> From<&'a TupleKey> for KeyOnly<'a> {
    fn from(t: &'a TupleKey) -> Self {
        KeyOnly {
            user: &t.user,
            relation: &t.relation,
            object: &t.object,
        }
    }
}

impl<'a> WriteBody<'a> {
    pub fn new(req: &'a WriteRequest) -> Self {
        WriteBody {
            writes: (!req.writes.is_empty()).then(|| WriteSection {
                tuple_keys: req.writes.iter().map(WriteKey::from).collect(),
                on_duplicate: req.on_duplicate,
            }),
            deletes: (!req.deletes.is_empty()).then(|| DeleteSection {
                tuple_keys: req.deletes.iter().map(KeyOnly::from).collect(),
                on_missing: req.on_missing,
            }),
            authorization_model_id: req.authorization_model_id.as_deref(),
        }
    }
}

/// One Check: is `user` related to `object` by `relation`?
#[derive(Clone, Debug, Default)]
pub struct CheckRequest {
    /// The user, e.g. `user:anne`.
    pub user: String,
    /// The relation, e.g. `viewer`.
    pub relation: String,
    /// The object, e.g. `document:1`.
    pub object: String,
    /// Tuples to consider as if written, for this check only (at most 100).
    pub contextual_tuples: Vec<TupleKey>,
    /// Values for condition parameters known at request time.
    pub context: Option<Context>,
    /// Pin the check to a model; `None`: the store's latest sent
    /// through [`Client`](super::Client), the handle's model (its pinned
    /// `openfga.model_id`, or the latest it read) through `WriteBehind`.
    pub authorization_model_id: Option<String>,
    /// Cache preference.
    pub consistency: Consistency,
}

impl CheckRequest {
    /// A check with no contextual tuples, context or consistency preference.
    pub fn new(
        user: impl Into<String>,
        relation: impl Into<String>,
        object: impl Into<String>,
    ) -> Self {
        CheckRequest {
            user: user.into(),
            relation: relation.into(),
            object: object.into(),
            ..Default::default()
        }
    }
}

#[derive(Serialize)]
pub(crate) struct CheckBody<'a> {
    pub tuple_key: KeyOnly<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contextual_tuples: Option<ContextualTuples<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a Context>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Consistency::is_unspecified")]
    pub consistency: Consistency,
}

#[derive(Serialize)]
pub(crate) struct ContextualTuples<'a> {
    pub tuple_keys: &'a [TupleKey],
}

impl<'a> CheckBody<'a> {
    pub fn new(req: &'a CheckRequest) -> Self {
        CheckBody {
            tuple_key: KeyOnly {
                user: &req.user,
                relation: &req.relation,
                object: &req.object,
            },
            contextual_tuples: (!req.contextual_tuples.is_empty()).then(|| ContextualTuples {
                tuple_keys: &req.contextual_tuples,
            }),
            context: req.context.as_ref(),
            authorization_model_id: req.authorization_model_id.as_deref(),
            consistency: req.consistency,
        }
    }
}

/// A ListObjects request: the objects of `object_type` on which `user` has
/// `relation`.
#[derive(Clone, Debug, Default)]
pub struct ListObjectsRequest {
    /// The user, e.g. `user:anne`.
    pub user: String,
    /// The relation, e.g. `viewer`.
    pub relation: String,
    /// The object type, e.g. `document`.
    pub object_type: String,
    /// Tuples to consider as if written, for this request only (at most 100).
    pub contextual_tuples: Vec<TupleKey>,
    /// Values for condition parameters known at request time.
    pub context: Option<Context>,
    /// Pin the request to a model; `None`: the store's latest sent
    /// through [`Client`](super::Client), the handle's model (its pinned
    /// `openfga.model_id`, or the latest it read) through `WriteBehind`.
    pub authorization_model_id: Option<String>,
    /// Cache preference.
    pub consistency: Consistency,
}

impl ListObjectsRequest {
    /// The objects of `object_type` on which `user` has `relation`.
    pub fn new(
        user: impl Into<String>,
        relation: impl Into<String>,
        object_type: impl Into<String>,
    ) -> Self {
        ListObjectsRequest {
            user: user.into(),
            relation: relation.into(),
            object_type: object_type.into(),
            ..Default::default()
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ListObjectsBody<'a> {
    #[serde(rename = "type")]
    pub object_type: &'a str,
    pub relation: &'a str,
    pub user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contextual_tuples: Option<ContextualTuples<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a Context>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Consistency::is_unspecified")]
    pub consistency: Consistency,
}

#[derive(Deserialize)]
pub(crate) struct ListObjectsResponse {
    #[serde(default)]
    pub objects: Vec<String>,
}

/// A ListUsers request: the users of the types in `user_filters` that have
/// `relation` on `object`.
#[derive(Clone, Debug, Default)]
pub struct ListUsersRequest {
    /// The object, e.g. `document:1`.
    pub object: String,
    /// The relation, e.g. `viewer`.
    pub relation: String,
    /// Which users: a type (`user`), or a userset type (`group#member`).
    /// OpenFGA takes exactly one.
    pub user_filter: String,
    /// Tuples to consider as if written, for this request only (at most 100).
    pub contextual_tuples: Vec<TupleKey>,
    /// Values for condition parameters known at request time.
    pub context: Option<Context>,
    /// Pin the request to a model; `None`: the store's latest sent
    /// through [`Client`](super::Client), the handle's model (its pinned
    /// `openfga.model_id`, or the latest it read) through `WriteBehind`.
    pub authorization_model_id: Option<String>,
    /// Cache preference.
    pub consistency: Consistency,
}

impl ListUsersRequest {
    /// The users of type `user_filter` (or userset type `type#relation`)
    /// that have `relation` on `object`.
    pub fn new(
        object: impl Into<String>,
        relation: impl Into<String>,
        user_filter: impl Into<String>,
    ) -> Self {
        ListUsersRequest {
            object: object.into(),
            relation: relation.into(),
            user_filter: user_filter.into(),
            ..Default::default()
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ObjectRef<'a> {
    #[serde(rename = "type")]
    pub object_type: &'a str,
    pub id: &'a str,
}

#[derive(Serialize)]
pub(crate) struct UserFilterBody<'a> {
    #[serde(rename = "type")]
    pub user_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relation: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct ListUsersBody<'a> {
    pub object: ObjectRef<'a>,
    pub relation: &'a str,
    pub user_filters: [UserFilterBody<'a>; 1],
    #[serde(skip_serializing_if = "<[TupleKey]>::is_empty")]
    pub contextual_tuples: &'a [TupleKey],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a Context>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Consistency::is_unspecified")]
    pub consistency: Consistency,
}

#[derive(Deserialize)]
pub(crate) struct ListUsersResponse {
    #[serde(default)]
    pub users: Vec<ListedUser>,
}

/// One user in a ListUsers answer: an object, a userset or a wildcard.
#[derive(Deserialize)]
pub(crate) struct ListedUser {
    #[serde(default)]
    pub object: Option<ListedObject>,
    #[serde(default)]
    pub userset: Option<ListedUserset>,
    #[serde(default)]
    pub wildcard: Option<ListedWildcard>,
}

#[derive(Deserialize)]
pub(crate) struct ListedObject {
    #[serde(rename = "type")]
    pub object_type: String,
    pub id: String,
}

#[derive(Deserialize)]
pub(crate) struct ListedUserset {
    #[serde(rename = "type")]
    pub object_type: String,
    pub id: String,
    pub relation: String,
}

#[derive(Deserialize)]
pub(crate) struct ListedWildcard {
    #[serde(rename = "type")]
    pub object_type: String,
}

impl ListedUser {
    /// The user as a tuple's user string (`user:anne`, `group:eng#member`,
    /// `user:*`), if OpenFGA sent one of the three shapes.
    pub fn as_user(&self) -> Option<String> {
        if let Some(o) = &self.object {
            return Some(format!("{}:{}", o.object_type, o.id));
        }
        if let Some(u) = &self.userset {
            return Some(format!("{}:{}#{}", u.object_type, u.id, u.relation));
        }
        self.wildcard
            .as_ref()
            .map(|w| format!("{}:*", w.object_type))
    }
}

#[derive(Deserialize)]
pub(crate) struct CheckResponse {
    #[serde(default)]
    pub allowed: bool,
}

#[derive(Serialize)]
pub(crate) struct BatchCheckBody<'a> {
    pub checks: Vec<BatchCheckItem<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_model_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Consistency::is_unspecified")]
    pub consistency: Consistency,
}

#[derive(Serialize)]
pub(crate) struct BatchCheckItem<'a> {
    pub tuple_key: KeyOnly<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contextual_tuples: Option<ContextualTuples<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a Context>,
    pub correlation_id: String,
}

#[derive(Deserialize)]
pub(crate) struct BatchCheckResponse {
    #[serde(default)]
    pub result: std::collections::HashMap<String, BatchCheckSingle>,
}

#[derive(Deserialize)]
pub(crate) struct BatchCheckSingle {
    #[serde(default)]
    pub allowed: bool,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

/// A filter for Read. All empty reads every tuple of the store; otherwise
/// OpenFGA requires `object` (`type:` alone matches every object of a type,
/// but only together with `user`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadFilter {
    /// Match this user exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Match this relation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
    /// Match this object (`type:` with a `user`: every object of the type).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct ReadBody<'a> {
    #[serde(skip_serializing_if = "is_empty_filter")]
    pub tuple_key: &'a ReadFilter,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Consistency::is_unspecified")]
    pub consistency: Consistency,
}

fn is_empty_filter(f: &&ReadFilter) -> bool {
    f.user.is_none() && f.relation.is_none() && f.object.is_none()
}

/// One page of Read results.
#[derive(Clone, Debug, Deserialize)]
pub struct ReadPage {
    /// The tuples on this page.
    #[serde(default)]
    pub tuples: Vec<StoredTuple>,
    /// Pass back to get the next page; empty on the last page.
    #[serde(default)]
    pub continuation_token: String,
}

/// A tuple as stored in OpenFGA.
#[derive(Clone, Debug, Deserialize)]
pub struct StoredTuple {
    /// The tuple.
    pub key: TupleKey,
    /// When it was written (RFC 3339).
    #[serde(default)]
    pub timestamp: String,
}

/// An authorization model, as OpenFGA returns it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthorizationModel {
    /// The model's id.
    #[serde(default)]
    pub id: String,
    /// `1.1` or later.
    #[serde(default)]
    pub schema_version: String,
    /// The types, their relations and rewrites.
    #[serde(default)]
    pub type_definitions: Vec<TypeDefinition>,
    /// Named conditions.
    #[serde(default)]
    pub conditions: serde_json::Map<String, serde_json::Value>,
}

/// One type of a model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeDefinition {
    /// The type's name.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Relation name to its rewrite (`this`, `computedUserset`, `union`, ...).
    #[serde(default)]
    pub relations: serde_json::Map<String, serde_json::Value>,
    /// Which user types each relation admits directly.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(crate) struct ModelEnvelope {
    pub authorization_model: AuthorizationModel,
}

#[derive(Deserialize)]
pub(crate) struct ModelList {
    #[serde(default)]
    pub authorization_models: Vec<AuthorizationModel>,
}

#[derive(Deserialize)]
pub(crate) struct ModelCreated {
    pub authorization_model_id: String,
}

#[derive(Deserialize)]
pub(crate) struct StoreCreated {
    pub id: String,
}

#[derive(Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn write_body_omits_empty_sections_and_deletes_drop_conditions() {
        let t = TupleKey::new("user:anne", "viewer", "document:1")
            .unwrap()
            .with_condition("non_expired", None)
            .unwrap();
        let req = WriteRequest::idempotent(vec![], vec![t]);
        let v = serde_json::to_value(WriteBody::new(&req)).unwrap();
        assert_eq!(
            v,
            json!({"deletes":{"tuple_keys":[{"user":"user:anne","relation":"viewer","object":"document:1"}],"on_missing":"ignore"}})
        );
    }
}
