//! What the authorization model tells us about tuples and checks.
//!
//! Two questions matter to a write-behind layer:
//!
//! * **Is this tuple valid?** Its object type and relation must exist, and its
//!   user must be one of the relation's directly related user types (with the
//!   right condition), or OpenFGA will refuse it at flush time.
//! * **Which checks can a tuple change?** A tuple on `folder#viewer` changes
//!   `document#viewer` checks through `viewer from parent`; a tuple on
//!   `document#blocked` changes `document#can_view` through `but not`. The
//!   answer is computed per `type#relation` from the rewrite graph, so it is
//!   broad (every object of the type) and never narrow: it is used to decide
//!   which cached answers to drop, which pending grants to send as contextual
//!   tuples, and which pending revokes a check must wait for.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::condition::Conditions;
use crate::openfga::AuthorizationModel;
use crate::tuple::{Field, TupleError, TupleKey};
use crate::NameMap;

/// `type#relation`, the unit of dependency.
pub(crate) type RelName = String;

/// The analysed model.
#[derive(Debug)]
pub(crate) struct Model {
    id: String,
    /// type -> relation -> allowed direct user types.
    relations: Relations,
    /// For each `type#relation`: every `type#relation` whose tuples can change
    /// its checks (itself included), as names.
    depends_on: HashMap<RelName, Vec<RelName>>,
    /// The same, each with whether only tuples on the checked object itself
    /// matter (reached through `this`, `computedUserset` and tuplesets only).
    scoped: HashMap<RelName, Vec<Dep>>,
    /// For each `type#relation`: the `type#relation`s whose checks its tuples
    /// can change.
    affects: HashMap<RelName, Vec<RelName>>,
    /// `type#relation`s where a direct tuple alone makes the check true
    /// (no exclusion or intersection sits above the direct assignment).
    direct_implies: HashSet<RelName>,
    /// For each `type#relation`: the `type#relation`s whose tuples can take
    /// its access away (reached through the subtracted side of a `but not`).
    may_deny: HashMap<RelName, HashSet<RelName>>,
    /// Each condition's parameter types, for the contexts of grants.
    conditions: Conditions,
}

type Relations = NameMap<String, NameMap<String, Vec<AllowedUser>>>;

#[derive(Debug, Clone, PartialEq)]
struct AllowedUser {
    type_name: String,
    relation: Option<String>,
    wildcard: bool,
    condition: Option<String>,
}

/// A relation a check depends on, and how far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dep {
    /// `type#relation`.
    pub rel: RelName,
    /// Only tuples whose object is the checked object can change the check
    /// through this relation; tuples on other objects cannot.
    pub same_object: bool,
    /// Moreover, such a tuple counts only through its user: it can change
    /// the check of user U only if its user is U, a wildcard (`type:*`) or
    /// a userset (`type:id#relation`). False for a tupleset relation (its
    /// tuples point at parent objects, whatever the user).
    pub user_bound: bool,
    /// A grant of this relation can take the checked access away (it sits
    /// under a `but not`): one that may or may not be in OpenFGA leaves the
    /// check's answer in doubt, as a revoke does.
    pub may_deny: bool,
}

impl Dep {
    /// The same relation, on every object and for every user (a list of
    /// objects can be changed by a tuple on any of them).
    pub fn anywhere(&self) -> Dep {
        Dep {
            same_object: false,
            user_bound: false,
            ..self.clone()
        }
    }

    /// The same relation and reach, for every user (a list of users can be
    /// changed by a tuple of any of them).
    pub fn any_user(&self) -> Dep {
        Dep {
            user_bound: false,
            ..self.clone()
        }
    }
}

pub(crate) fn rel_name(object_type: &str, relation: &str) -> RelName {
    format!("{object_type}#{relation}")
}

impl Model {
    /// Analyses a model as OpenFGA returns it.
    pub fn new(m: &AuthorizationModel) -> Model {
        let mut relations = Relations::default();
        // Edges carry whether the dependency stays on the same object, and
        // whether its tuples still match the checked user.
        let mut edges: HashMap<RelName, HashSet<Edge>> = HashMap::new();
        let mut negated_edges: HashMap<RelName, HashSet<RelName>> = HashMap::new();
        let mut direct_implies = HashSet::new();
        // Relations whose directly related user types the model states.
        let mut described = HashSet::new();

        for td in &m.type_definitions {
            let rels = relations.entry(td.type_name.clone()).or_default();
            for name in td.relations.keys() {
                let listed = td
                    .metadata
                    .as_ref()
                    .and_then(|md| md.get("relations"))
                    .and_then(|r| r.get(name))
                    .and_then(|r| r.get("directly_related_user_types"))
                    .and_then(Value::as_array);
                if listed.is_some() {
                    described.insert(rel_name(&td.type_name, name));
                }
                let allowed = listed
                    .map(|list| list.iter().filter_map(parse_allowed).collect())
                    .unwrap_or_default();
                rels.insert(name.clone(), allowed);
            }
        }
        // A direct relation or a tupleset without its user types (metadata
        // stripped, or a model from before schema 1.1): the usersets and
        // parents its tuples lead to are unknown, so no dependency is
        // trusted, and every op counts for every check.
        let mut blind = false;
        for td in &m.type_definitions {
            for (name, rewrite) in &td.relations {
                let me = rel_name(&td.type_name, name);
                let mut direct = Direct::default();
                collect_deps(&td.type_name, name, rewrite, &relations, false, &mut direct);
                blind |= direct
                    .reads
                    .iter()
                    .any(|r| !described.contains(&rel_name(&td.type_name, r)));
                if implies_directly(rewrite) {
                    direct_implies.insert(me.clone());
                }
                edges.insert(me.clone(), direct.edges);
                negated_edges.insert(me, direct.negated);
            }
        }

        // Transitive closure over (relation, still on the same object, still
        // matching the checked user): small graphs (tens to hundreds of
        // relations). A relation reached several ways keeps the widest.
        let mut depends_on = HashMap::new();
        let mut scoped = HashMap::new();
        let mut may_deny = HashMap::new();
        for start in edges.keys() {
            // (relation, same object, same user, through a `but not`)
            let mut seen: HashSet<(RelName, bool, bool, bool)> = HashSet::new();
            let mut stack = vec![(start.clone(), true, true, false)];
            while let Some((n, same, user, neg)) = stack.pop() {
                if seen.insert((n.clone(), same, user, neg)) {
                    let negated = negated_edges.get(&n);
                    for (m, edge_same, edge_user) in edges.get(&n).into_iter().flatten() {
                        let same = same && *edge_same;
                        let neg = neg || negated.is_some_and(|x| x.contains(m));
                        stack.push((m.clone(), same, user && same && *edge_user, neg));
                    }
                }
            }
            let mut deps: HashMap<RelName, (bool, bool)> = HashMap::new();
            let mut denying = HashSet::new();
            for (rel, same, user, neg) in seen {
                if neg {
                    denying.insert(rel.clone());
                }
                let e = deps.entry(rel).or_insert((true, true));
                *e = (e.0 && same, e.1 && user);
            }
            let mut v: Vec<Dep> = deps
                .into_iter()
                .map(|(rel, (same_object, user_bound))| Dep {
                    may_deny: denying.contains(&rel),
                    rel,
                    same_object,
                    user_bound: same_object && user_bound,
                })
                .collect();
            v.sort_by(|a, b| a.rel.cmp(&b.rel));
            may_deny.insert(start.clone(), denying);
            depends_on.insert(start.clone(), v.iter().map(|d| d.rel.clone()).collect());
            scoped.insert(start.clone(), v);
        }
        let mut affects: HashMap<RelName, Vec<RelName>> = HashMap::new();
        for (check, deps) in &depends_on {
            let deps: &Vec<RelName> = deps;
            for d in deps {
                affects.entry(d.clone()).or_default().push(check.clone());
            }
        }
        for v in affects.values_mut() {
            v.sort();
        }
        if blind {
            depends_on.clear();
            scoped.clear();
            affects.clear();
            direct_implies.clear();
            may_deny.clear();
        }
        Model {
            id: m.id.clone(),
            relations,
            depends_on,
            scoped,
            affects,
            direct_implies,
            may_deny,
            conditions: Conditions::parse(&m.conditions),
        }
    }

    /// The model's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The relations of one type (none for a type the model lacks).
    pub fn relations_of(&self, object_type: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .relations
            .get(object_type)
            .map(|r| r.keys().map(String::as_str).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Every `type#relation` of the model.
    pub fn relation_names(&self) -> impl Iterator<Item = &RelName> {
        self.depends_on.keys()
    }

    /// Checks a tuple to write against the model: type, relation, and
    /// allowed user types (with the right condition).
    pub fn validate(&self, t: &TupleKey) -> Result<(), TupleError> {
        let ty = t.object_type();
        let Some(rels) = self.relations.get(ty) else {
            return Err(TupleError::new(
                Field::Object,
                &t.object,
                format!("has type {ty:?}, which the authorization model does not define"),
            ));
        };
        let Some(allowed) = rels.get(&t.relation) else {
            return Err(TupleError::new(
                Field::Relation,
                &t.relation,
                format!("is not a relation of type {ty:?} in the authorization model"),
            ));
        };
        let user_type = t.user_type();
        let user_rel = t.user_relation();
        let wildcard = t.is_wildcard_user();
        let cond = t.condition.as_ref().map(|c| c.name.as_str());
        // As OpenFGA judges it: the user's kind against the type
        // restrictions, whatever their conditions; then the condition on
        // its own (one restriction of the user's type naming it, or, with
        // none, an unconditional restriction that fits the user).
        let kind_ok = allowed.iter().any(|a| {
            a.type_name == user_type
                && match (user_rel, wildcard) {
                    (Some(r), _) => a.relation.as_deref() == Some(r),
                    (None, true) => a.wildcard,
                    (None, false) => !a.wildcard && a.relation.is_none(),
                }
        });
        let condition_ok = match cond {
            Some(c) => allowed
                .iter()
                .any(|a| a.type_name == user_type && a.condition.as_deref() == Some(c)),
            None => allowed.iter().any(|a| {
                a.type_name == user_type
                    && a.condition.is_none()
                    && if a.relation.is_some() || a.wildcard {
                        a.relation.as_deref().is_none_or(|r| Some(r) == user_rel)
                            && (!a.wildcard || wildcard)
                    } else {
                        !wildcard
                    }
            }),
        };
        let ok = kind_ok && condition_ok;
        if ok {
            // A grant's context, too: OpenFGA converts it to the
            // condition's parameter types, or refuses the tuple.
            let context = t.condition.as_ref();
            let refused = context.and_then(|c| {
                let why = self.conditions.refuses(&c.name, c.context.as_ref()?)?;
                Some(TupleError::new(Field::Condition, &c.name, why))
            });
            return refused.map_or(Ok(()), Err);
        }
        let shown: Vec<String> = allowed.iter().map(AllowedUser::to_string).collect();
        let what = match cond {
            Some(c) => format!("{} with {c}", t.user),
            None => t.user.clone(),
        };
        Err(TupleError::new(
            Field::User,
            &t.user,
            if shown.is_empty() {
                format!(
                    "cannot be written to {ty}#{}: the relation takes no direct tuples",
                    t.relation
                )
            } else {
                format!(
                    "({what}) is not allowed for {ty}#{}; allowed: {}",
                    t.relation,
                    shown.join(", ")
                )
            },
        ))
    }

    /// Every `type#relation` whose tuples can change a check of `relation` on
    /// an object of `object_type`; `None` when the model does not know it
    /// (the caller then treats everything as relevant).
    pub fn depends_on(&self, object_type: &str, relation: &str) -> Option<&[RelName]> {
        self.depends_on
            .get(&rel_name(object_type, relation))
            .map(Vec::as_slice)
    }

    /// [`Model::depends_on`], with how far each dependency reaches.
    pub fn depends_on_scoped(&self, object_type: &str, relation: &str) -> Option<&[Dep]> {
        self.scoped
            .get(&rel_name(object_type, relation))
            .map(Vec::as_slice)
    }

    /// Every `type#relation` whose checks a tuple of `rel` can change; `None`
    /// for a relation the model does not know.
    pub fn affects(&self, rel: &str) -> Option<&[RelName]> {
        self.affects.get(rel).map(Vec::as_slice)
    }

    /// Whether a tuple of `tuple_rel` can take away access checked on
    /// `object_type#relation` (it sits under a `but not`); true for
    /// relations the model does not know.
    pub fn may_deny(&self, object_type: &str, relation: &str, tuple_rel: &str) -> bool {
        self.may_deny
            .get(&rel_name(object_type, relation))
            .is_none_or(|d| d.contains(tuple_rel))
    }

    /// Whether a direct, unconditional tuple on `object_type#relation` makes
    /// the check of that same tuple true by itself.
    pub fn direct_implies(&self, object_type: &str, relation: &str) -> bool {
        self.direct_implies
            .contains(&rel_name(object_type, relation))
    }
}

impl std::fmt::Display for AllowedUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.type_name)?;
        if self.wildcard {
            f.write_str(":*")?;
        }
        if let Some(r) = &self.relation {
            write!(f, "#{r}")?;
        }
        if let Some(c) = &self.condition {
            write!(f, " with {c}")?;
        }
        Ok(())
    }
}

fn parse_allowed(v: &Value) -> Option<AllowedUser> {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Some(AllowedUser {
        type_name: v.get("type")?.as_str()?.to_owned(),
        relation: v
            .get("relation")
            .and_then(Value::as_str)
            .and_then(non_empty),
        wildcard: v.get("wildcard").is_some(),
        condition: v
            .get("condition")
            .and_then(Value::as_str)
            .and_then(non_empty),
    })
}

/// The `type#relation`s whose tuples one relation's rewrite reads.
/// A dependency edge: (relation, on the same object, its tuples matched
/// against the checked user).
type Edge = (RelName, bool, bool);

/// A relation's direct dependencies, and which of them sit under the
/// subtracted side of a `but not` (a tuple there can take access away).
#[derive(Default)]
struct Direct {
    edges: HashSet<Edge>,
    negated: HashSet<RelName>,
    /// Relations of the same type whose directly related user types the
    /// analysis needs: direct ones (`this`) and tuplesets.
    reads: Vec<String>,
}

impl Direct {
    fn insert(&mut self, edge: Edge, neg: bool) {
        if neg {
            self.negated.insert(edge.0.clone());
        }
        self.edges.insert(edge);
    }
}

fn collect_deps(
    ty: &str,
    relation: &str,
    rewrite: &Value,
    relations: &Relations,
    neg: bool,
    out: &mut Direct,
) {
    let Some(obj) = rewrite.as_object() else {
        return;
    };
    if obj.contains_key("this") {
        out.reads.push(relation.to_owned());
        out.insert((rel_name(ty, relation), true, true), neg);
        // Usersets (`group#member`) pull in the tuples of that relation too,
        // on the group objects, not the checked one.
        for a in relations
            .get(ty)
            .and_then(|r| r.get(relation))
            .into_iter()
            .flatten()
        {
            if let Some(r) = &a.relation {
                out.insert((rel_name(&a.type_name, r), false, false), neg);
            }
        }
    }
    if let Some(cu) = obj.get("computedUserset") {
        if let Some(r) = cu.get("relation").and_then(Value::as_str) {
            out.insert((rel_name(ty, r), true, true), neg);
        }
    }
    if let Some(ttu) = obj.get("tupleToUserset") {
        let tupleset = ttu
            .get("tupleset")
            .and_then(|t| t.get("relation"))
            .and_then(Value::as_str);
        let computed = ttu
            .get("computedUserset")
            .and_then(|c| c.get("relation"))
            .and_then(Value::as_str);
        if let Some(ts) = tupleset {
            // The tupleset's tuples are on the checked object; the relation
            // they lead to is on other objects (the parents).
            out.reads.push(ts.to_owned());
            out.insert((rel_name(ty, ts), true, false), neg);
            if let Some(cr) = computed {
                for a in relations
                    .get(ty)
                    .and_then(|r| r.get(ts))
                    .into_iter()
                    .flatten()
                {
                    out.insert((rel_name(&a.type_name, cr), false, false), neg);
                }
            }
        }
    }
    for key in ["union", "intersection"] {
        if let Some(children) = obj
            .get(key)
            .and_then(|u| u.get("child"))
            .and_then(Value::as_array)
        {
            for c in children {
                collect_deps(ty, relation, c, relations, neg, out);
            }
        }
    }
    if let Some(d) = obj.get("difference") {
        for (part, negates) in [("base", false), ("subtract", true)] {
            if let Some(c) = d.get(part) {
                collect_deps(ty, relation, c, relations, neg || negates, out);
            }
        }
    }
}

/// `this`, or a union with `this` among its children (at any union depth).
fn implies_directly(rewrite: &Value) -> bool {
    if rewrite.get("this").is_some() {
        return true;
    }
    rewrite
        .get("union")
        .and_then(|u| u.get("child"))
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(implies_directly))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let m: AuthorizationModel =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Model::new(&m)
    }

    fn t(user: &str, rel: &str, obj: &str) -> TupleKey {
        TupleKey::new(user, rel, obj).unwrap()
    }

    #[test]
    fn dependencies_follow_rewrites() {
        let m = model();
        let deps = m.depends_on("document", "viewer").unwrap();
        for d in [
            "document#viewer",
            "document#editor",
            "document#owner",
            "document#parent",
            "folder#viewer",
            "folder#editor",
            "folder#owner",
            "folder#parent",
            "group#member",
        ] {
            assert!(deps.iter().any(|x| x == d), "{d} missing from {deps:?}");
        }
        assert!(!deps.iter().any(|x| x == "document#blocked"));
        let can_view = m.depends_on("document", "can_view").unwrap();
        assert!(can_view.iter().any(|x| x == "document#blocked"));
        let affected = m.affects("document#blocked").unwrap();
        assert_eq!(affected, ["document#blocked", "document#can_view"]);
    }

    /// A model whose direct relations lack their user types (metadata
    /// stripped on the way) cannot say which usersets a check reads: no
    /// dependency is trusted, every op changes every cached answer, and no
    /// pending grant answers a check by itself. Read as "no usersets", a
    /// revoked group membership would not hold back a document check.
    #[test]
    fn a_model_without_user_types_trusts_no_dependency() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for td in v["type_definitions"].as_array_mut().unwrap() {
            td.as_object_mut().unwrap().remove("metadata");
        }
        let m = Model::new(&serde_json::from_value(v).unwrap());
        assert_eq!(m.depends_on("document", "viewer"), None);
        assert_eq!(m.depends_on_scoped("document", "viewer"), None);
        assert_eq!(m.affects("group#member"), None);
        assert!(!m.direct_implies("document", "viewer"));
        assert!(m.may_deny("document", "viewer", "document#viewer"));
        // With them, the same model is analysed.
        assert!(model().depends_on("document", "viewer").is_some());
    }

    #[test]
    fn dependencies_know_which_stay_on_the_checked_object() {
        let m = model();
        let deps = m.depends_on_scoped("document", "viewer").unwrap();
        let same = |r: &str| deps.iter().find(|d| d.rel == r).map(|d| d.same_object);
        // A document's own viewer, editor, owner and parent tuples.
        assert_eq!(same("document#viewer"), Some(true));
        assert_eq!(same("document#editor"), Some(true));
        assert_eq!(same("document#owner"), Some(true));
        assert_eq!(same("document#parent"), Some(true));
        // Through the parent folder or a group: other objects.
        assert_eq!(same("folder#viewer"), Some(false));
        assert_eq!(same("folder#parent"), Some(false));
        assert_eq!(same("group#member"), Some(false));
        // A folder viewer check reaches folder#viewer on other folders too
        // (viewer from parent), so there it is not same-object.
        let f = m.depends_on_scoped("folder", "viewer").unwrap();
        assert!(f.iter().any(|d| d.rel == "folder#viewer" && !d.same_object));
    }

    #[test]
    fn dependencies_know_which_tuples_count_only_for_their_user() {
        let m = model();
        let deps = m.depends_on_scoped("document", "can_view").unwrap();
        let bound = |r: &str| deps.iter().find(|d| d.rel == r).map(|d| d.user_bound);
        // Direct assignments on the document, and its blocked list.
        assert_eq!(bound("document#viewer"), Some(true));
        assert_eq!(bound("document#editor"), Some(true));
        assert_eq!(bound("document#blocked"), Some(true));
        // The parent tuple points at a folder: it counts for every user.
        assert_eq!(bound("document#parent"), Some(false));
        assert_eq!(bound("folder#viewer"), Some(false));
        assert_eq!(bound("group#member"), Some(false));
    }

    #[test]
    fn only_tuples_under_a_but_not_can_take_access_away() {
        let m = model();
        assert!(m.may_deny("document", "can_view", "document#blocked"));
        assert!(!m.may_deny("document", "can_view", "document#viewer"));
        assert!(!m.may_deny("document", "can_view", "group#member"));
        assert!(!m.may_deny("document", "viewer", "document#blocked"));
        assert!(!m.may_deny("document", "can_share", "document#owner"));
        assert!(
            m.may_deny("planet", "x", "document#viewer"),
            "unknown: assume it can"
        );
        // The same, on each dependency a check's pending ops are looked
        // up by (and a list's, on any object).
        let deps = m.depends_on_scoped("document", "can_view").unwrap();
        let deny = |r: &str| deps.iter().find(|d| d.rel == r).map(|d| d.may_deny);
        assert_eq!(deny("document#blocked"), Some(true));
        assert_eq!(deny("document#viewer"), Some(false));
        assert_eq!(deny("group#member"), Some(false));
        assert!(deps.iter().all(|d| d.anywhere().may_deny == d.may_deny));
    }

    #[test]
    fn direct_implication_only_without_exclusion() {
        let m = model();
        assert!(m.direct_implies("document", "viewer"));
        assert!(m.direct_implies("document", "blocked"));
        assert!(!m.direct_implies("document", "can_view"));
        assert!(!m.direct_implies("document", "can_share"));
    }

    #[test]
    fn validation_against_the_model() {
        let m = model();
        assert!(m.validate(&t("user:anne", "viewer", "document:1")).is_ok());
        assert!(m.validate(&t("user:*", "viewer", "document:1")).is_ok());
        assert!(m
            .validate(&t("group:eng#member", "viewer", "document:1"))
            .is_ok());
        assert!(m.validate(&t("folder:f", "parent", "document:1")).is_ok());
        let e = m
            .validate(&t("user:anne", "viewer", "planet:1"))
            .unwrap_err();
        assert_eq!(e.field, Field::Object);
        let e = m
            .validate(&t("user:anne", "reader", "document:1"))
            .unwrap_err();
        assert_eq!(e.field, Field::Relation);
        let e = m
            .validate(&t("user:anne", "parent", "document:1"))
            .unwrap_err();
        assert_eq!(e.field, Field::User);
        assert!(e.reason.contains("allowed: folder"), "{e}");
        let e = m
            .validate(&t("user:*", "editor", "document:1"))
            .unwrap_err();
        assert_eq!(e.field, Field::User);
        let cond = t("user:anne", "viewer", "document:1")
            .with_condition("non_expired", None)
            .unwrap();
        assert!(m.validate(&cond).is_ok());
        let cond = t("user:anne", "editor", "document:1")
            .with_condition("non_expired", None)
            .unwrap();
        assert!(m.validate(&cond).is_err());
        let e = m
            .validate(&t("user:anne", "can_view", "document:1"))
            .unwrap_err();
        assert!(e.reason.contains("takes no direct tuples"), "{e}");
    }
}
