//! Relationship tuples, and the validation OpenFGA would apply to them.
//!
//! A tuple is refused here, at the call, with an error that names the field and
//! the rule, so nothing that OpenFGA would reject is ever acknowledged. The
//! rules are OpenFGA's own:
//!
//! * `user`: at most 512 bytes; `type:id`, `type:*` (wildcard) or
//!   `type:id#relation` (userset);
//! * `relation`: `^[^:#@\s]{1,50}$`;
//! * `object`: `type:id`, `^[^\s]{2,256}$`;
//! * a type is `^[^:#@\s]{1,254}$`, an id has no `:`, `#` or whitespace;
//! * a condition name is `^[^\s]{2,256}$`.
//!
//! "Whitespace" is what OpenFGA refuses, which is not Unicode's whitespace:
//! its regexes' `\s` is ASCII only (tab, newline, form feed, carriage
//! return, space) and its own checks refuse the space and every control
//! character (`U+0000`-`U+001F`, `U+007F`-`U+009F`). So `U+00A0`, `U+3000`
//! and `U+2028` are accepted in ids, as OpenFGA accepts them, and `U+0001`
//! or `U+0085` are refused, as OpenFGA refuses them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest `user` OpenFGA accepts, in bytes.
pub const MAX_USER_BYTES: usize = 512;
/// Longest `relation` OpenFGA accepts, in characters.
pub const MAX_RELATION_CHARS: usize = 50;
/// Longest `object` OpenFGA accepts, in characters.
pub const MAX_OBJECT_CHARS: usize = 256;
/// Longest type name OpenFGA accepts, in characters.
const MAX_TYPE_CHARS: usize = 254;

/// A relationship tuple: `user` has `relation` on `object`, optionally only
/// when a named condition holds.
///
/// Its JSON form is OpenFGA's `TupleKey`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TupleKey {
    /// `type:id`, `type:*` or `type:id#relation`.
    pub user: String,
    /// The relation, as named in the authorization model.
    pub relation: String,
    /// `type:id`.
    pub object: String,
    /// A condition that must hold for the tuple to count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
}

/// A tuple's condition: the name of a condition in the model, and the values
/// of some of its parameters, fixed when the tuple is written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// The condition's name in the authorization model.
    pub name: String,
    /// Parameter values stored with the tuple.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What to do with a tuple: write it or delete it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Write the tuple.
    Grant,
    /// Delete the tuple.
    Revoke,
}

/// Which part of a tuple was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The `user` field.
    User,
    /// The `relation` field.
    Relation,
    /// The `object` field.
    Object,
    /// The condition's name.
    Condition,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::User => "user",
            Field::Relation => "relation",
            Field::Object => "object",
            Field::Condition => "condition",
        })
    }
}

/// Why a tuple was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} {reason}")]
pub struct TupleError {
    /// The field at fault.
    pub field: Field,
    /// The value given (cut to 80 characters).
    pub value: String,
    /// What rule it breaks, phrased to finish the sentence "user X ...".
    pub reason: String,
}

impl TupleError {
    pub(crate) fn new(field: Field, value: &str, reason: impl Into<String>) -> Self {
        TupleError {
            field,
            value: shorten(value),
            reason: reason.into(),
        }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

impl TupleKey {
    /// A validated tuple with no condition.
    pub fn new(
        user: impl Into<String>,
        relation: impl Into<String>,
        object: impl Into<String>,
    ) -> Result<Self, TupleError> {
        let t = TupleKey::unvalidated(user, relation, object);
        t.validate()?;
        Ok(t)
    }

    /// A tuple not yet validated, for a caller that validates it next.
    pub(crate) fn unvalidated(
        user: impl Into<String>,
        relation: impl Into<String>,
        object: impl Into<String>,
    ) -> Self {
        TupleKey {
            user: user.into(),
            relation: relation.into(),
            object: object.into(),
            condition: None,
        }
    }

    /// The same tuple, only when `condition` holds with `context` fixed.
    pub fn with_condition(
        mut self,
        name: impl Into<String>,
        context: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Self, TupleError> {
        self.condition = Some(Condition {
            name: name.into(),
            context,
        });
        self.validate()?;
        Ok(self)
    }

    /// Checks every field against OpenFGA's rules.
    pub fn validate(&self) -> Result<(), TupleError> {
        self.validate_fields(false)
    }

    /// The fields; with `written`, also what OpenFGA refuses only in what is
    /// written (control characters in a context), so that ops and letters an
    /// older version stored with such a context stay readable.
    fn validate_fields(&self, written: bool) -> Result<(), TupleError> {
        validate_user(&self.user)?;
        validate_relation(&self.relation)?;
        validate_object(&self.object)?;
        if let Some(c) = &self.condition {
            validate_condition_name(&c.name)?;
            if let Some(why) = c.context.as_ref().and_then(|c| context_problem(c, written)) {
                return Err(TupleError::new(Field::Condition, &c.name, why));
            }
        }
        Ok(())
    }

    /// Checks that OpenFGA would store the tuple: [`TupleKey::validate`],
    /// and no userset of the tuple's own object and relation (such a tuple
    /// is implicit; OpenFGA refuses to write it, though it may be checked).
    pub fn validate_for_write(&self) -> Result<(), TupleError> {
        self.validate_fields(true)?;
        self.refuse_implicit("the tuple would relate a set to itself, which OpenFGA refuses to write (implicit tuple)")?;
        if let Some(c) = &self.condition {
            let size = c.context.as_ref().map_or(0, struct_size);
            if size > MAX_WRITE_CONTEXT_BYTES {
                return Err(TupleError::new(
                    Field::Condition,
                    &c.name,
                    format!("has a context of {size} bytes as OpenFGA stores it; OpenFGA writes at most {MAX_WRITE_CONTEXT_BYTES}"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a context string that reads as a number OpenFGA is slow to
    /// refuse (see [`crate::condition::slow_to_refuse`]): for a grant
    /// checked without the model (not read yet, or validation off), whose
    /// parameters' types are then unknown. With the model, its types decide.
    pub(crate) fn refuse_slow_numbers(&self) -> Result<(), TupleError> {
        let Some(c) = &self.condition else {
            return Ok(());
        };
        if let Some(s) = c.context.as_ref().and_then(slow_number) {
            return Err(TupleError::new(
                Field::Condition,
                &c.name,
                format!("has a context string value {:?} that reads as a number so far past a double's range that OpenFGA's refusal (it spells the number out in decimal) would keep the server busy for minutes: refused while fga-wb has no model to tell the parameter's type", shorten(s)),
            ));
        }
        Ok(())
    }

    /// Checks that OpenFGA would delete the tuple: its fields' syntax
    /// ([`TupleKey::validate`]). OpenFGA holds deletes to no model, and
    /// deleting a tuple it does not hold changes nothing. Refused too: an
    /// implicit tuple (a set related to itself), which OpenFGA takes a
    /// delete of, but never stores and always answers allowed: the revoke
    /// would be acknowledged and never be seen.
    pub fn validate_for_delete(&self) -> Result<(), TupleError> {
        self.validate_fields(true)?;
        self.refuse_implicit("OpenFGA never stores such a tuple and always answers it allowed (implicit tuple), so it cannot be revoked")
    }

    /// Refuses OpenFGA's implicit tuple, `object#relation@object#relation`,
    /// saying `why`.
    fn refuse_implicit(&self, why: &str) -> Result<(), TupleError> {
        if self.user.split_once('#') == Some((self.object.as_str(), self.relation.as_str())) {
            return Err(TupleError::new(
                Field::User,
                &self.user,
                format!("is the tuple's own object and relation: {why}"),
            ));
        }
        Ok(())
    }

    /// The object's type, the part before `:`.
    pub fn object_type(&self) -> &str {
        type_of(&self.object)
    }

    /// The user's type, the part before `:`.
    pub fn user_type(&self) -> &str {
        type_of(&self.user)
    }

    /// The relation of a userset user (`group:eng#member` gives `member`).
    pub fn user_relation(&self) -> Option<&str> {
        self.user.split_once('#').map(|(_, r)| r)
    }

    /// Whether the user is a wildcard (`type:*`).
    pub fn is_wildcard_user(&self) -> bool {
        self.user.ends_with(":*")
    }
}

fn type_of(s: &str) -> &str {
    s.split_once(':').map_or(s, |(t, _)| t)
}

/// The canonical `object#relation@user` form, as OpenFGA prints tuples.
impl fmt::Display for TupleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}@{}", self.object, self.relation, self.user)?;
        if let Some(c) = &self.condition {
            write!(f, " (when {})", c.name)?;
        }
        Ok(())
    }
}

/// Parses `object#relation@user`, for example `document:1#viewer@user:anne`.
impl FromStr for TupleKey {
    type Err = TupleError;

    fn from_str(s: &str) -> Result<Self, TupleError> {
        // An object never contains '#', a relation never contains '@', so the
        // first of each splits the string unambiguously.
        let (object, rest) = s.split_once('#').ok_or_else(|| {
            TupleError::new(
                Field::Object,
                s,
                "is not a tuple of the form object#relation@user",
            )
        })?;
        let (relation, user) = rest.split_once('@').ok_or_else(|| {
            TupleError::new(
                Field::User,
                s,
                "is not a tuple of the form object#relation@user",
            )
        })?;
        TupleKey::new(user, relation, object)
    }
}

/// A character OpenFGA refuses anywhere in a tuple: the ASCII space and
/// the control characters (which include `\t`, `\n`, `\x0c` and `\r`, the
/// rest of its regexes' `\s`).
fn is_forbidden(c: char) -> bool {
    c == ' ' || c.is_control()
}

fn is_bad_name_char(c: char) -> bool {
    c == ':' || c == '#' || c == '@' || is_forbidden(c)
}

fn is_bad_id_char(c: char) -> bool {
    c == ':' || c == '#' || is_forbidden(c)
}

fn validate_type(field: Field, whole: &str, ty: &str) -> Result<(), TupleError> {
    if ty.is_empty() {
        return Err(TupleError::new(
            field,
            whole,
            "has an empty type before ':'",
        ));
    }
    if chars_over(ty, MAX_TYPE_CHARS).is_some() {
        return Err(TupleError::new(
            field,
            whole,
            format!("has a type longer than {MAX_TYPE_CHARS} characters"),
        ));
    }
    if ty.chars().any(is_bad_name_char) {
        return Err(TupleError::new(
            field,
            whole,
            "has a type containing ':', '#', '@', a space or a control character (whitespace)",
        ));
    }
    Ok(())
}

/// How many characters `s` has, if more than `max`. Counted only when its
/// bytes could be (a character is at least one byte): every grant checks
/// three names, nearly all short.
fn chars_over(s: &str, max: usize) -> Option<usize> {
    if s.len() <= max {
        return None;
    }
    let n = s.chars().count();
    (n > max).then_some(n)
}

fn validate_id(field: Field, whole: &str, id: &str) -> Result<(), TupleError> {
    if id.is_empty() {
        return Err(TupleError::new(field, whole, "has an empty id after ':'"));
    }
    if id.chars().any(is_bad_id_char) {
        return Err(TupleError::new(
            field,
            whole,
            "has an id containing ':', '#', a space or a control character (whitespace)",
        ));
    }
    Ok(())
}

/// Checks a `user`: `type:id`, `type:*` or `type:id#relation`, at most 512 bytes.
pub fn validate_user(user: &str) -> Result<(), TupleError> {
    if user.len() > MAX_USER_BYTES {
        return Err(TupleError::new(
            Field::User,
            user,
            format!(
                "is {} bytes; OpenFGA allows at most {MAX_USER_BYTES}",
                user.len()
            ),
        ));
    }
    validate_user_shape(user)
}

/// Checks the user a check asks about: as [`validate_user`], but at most 512
/// characters, as OpenFGA's Check counts them (a tuple's user counts bytes).
pub fn validate_check_user(user: &str) -> Result<(), TupleError> {
    if let Some(n) = chars_over(user, MAX_USER_BYTES) {
        return Err(TupleError::new(
            Field::User,
            user,
            format!("is {n} characters; OpenFGA's Check allows at most {MAX_USER_BYTES}"),
        ));
    }
    validate_user_shape(user)
}

fn validate_user_shape(user: &str) -> Result<(), TupleError> {
    let f = Field::User;
    if user.is_empty() {
        return Err(TupleError::new(f, user, "is empty; the user is required"));
    }
    let Some((ty, rest)) = user.split_once(':') else {
        return Err(TupleError::new(
            f,
            user,
            "must be type:id, type:* or type:id#relation (for example user:anne)",
        ));
    };
    validate_type(f, user, ty)?;
    match rest.split_once('#') {
        Some((id, relation)) => {
            validate_id(f, user, id)?;
            if id == "*" {
                return Err(TupleError::new(
                    f,
                    user,
                    "combines a wildcard with a relation; use type:* or type:id#relation",
                ));
            }
            // OpenFGA refuses a `*` anywhere after the type in a userset.
            if rest.contains('*') {
                return Err(TupleError::new(
                    f,
                    user,
                    "has a `*` in a userset's id or relation, which OpenFGA refuses",
                ));
            }
            if let Err(e) = validate_relation(relation) {
                return Err(TupleError::new(
                    f,
                    user,
                    format!("has a userset relation that {}", e.reason),
                ));
            }
            Ok(())
        }
        None => validate_id(f, user, rest),
    }
}

/// Checks a `relation`: `^[^:#@\s]{1,50}$`.
pub fn validate_relation(relation: &str) -> Result<(), TupleError> {
    let f = Field::Relation;
    if relation.is_empty() {
        return Err(TupleError::new(
            f,
            relation,
            "is empty; the relation is required",
        ));
    }
    if let Some(n) = chars_over(relation, MAX_RELATION_CHARS) {
        return Err(TupleError::new(
            f,
            relation,
            format!("is {n} characters; OpenFGA allows at most {MAX_RELATION_CHARS}"),
        ));
    }
    if relation.chars().any(is_bad_name_char) {
        return Err(TupleError::new(
            f,
            relation,
            "must not contain ':', '#', '@', a space or a control character (whitespace)",
        ));
    }
    Ok(())
}

/// Checks an `object`: `type:id`, 2 to 256 characters, no whitespace.
pub fn validate_object(object: &str) -> Result<(), TupleError> {
    let f = Field::Object;
    if object.is_empty() {
        return Err(TupleError::new(
            f,
            object,
            "is empty; the object is required",
        ));
    }
    if let Some(n) = chars_over(object, MAX_OBJECT_CHARS) {
        return Err(TupleError::new(
            f,
            object,
            format!("is {n} characters; OpenFGA allows at most {MAX_OBJECT_CHARS}"),
        ));
    }
    let Some((ty, id)) = object.split_once(':') else {
        return Err(TupleError::new(
            f,
            object,
            "must be type:id (for example document:budget)",
        ));
    };
    validate_type(f, object, ty)?;
    validate_id(f, object, id)?;
    if id == "*" {
        return Err(TupleError::new(
            f,
            object,
            "must name one object; wildcards are only allowed in user",
        ));
    }
    Ok(())
}

/// Deepest nesting of a condition's context taken: what fga-wb stores (in
/// Redis, in queue jobs) it must read back, and serde_json reads at most 128
/// levels, the condition's own object included.
const MAX_CONTEXT_DEPTH: usize = 100;

/// The most bytes a written tuple's condition context takes in OpenFGA's
/// protobuf form (`google.protobuf.Struct`); past it a Write is refused.
/// Checks and their contextual tuples have no such limit.
const MAX_WRITE_CONTEXT_BYTES: usize = 32 * 1024;

/// The size of a context as OpenFGA measures it: the protobuf encoding of a
/// `Struct` (map entries of a key and a `Value`, whose oneof is always
/// encoded; numbers as doubles). The depth is bounded by
/// [`context_problem`], checked before.
fn struct_size(m: &serde_json::Map<String, serde_json::Value>) -> usize {
    m.iter()
        .map(|(k, v)| {
            // The entry's key (field 1) and value (field 2), each tagged.
            let entry = 1 + bytes_size(k.len()) + 1 + bytes_size(value_size(v));
            1 + bytes_size(entry)
        })
        .sum()
}

/// A `google.protobuf.Value`'s encoded size.
fn value_size(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    1 + match v {
        Value::Null | Value::Bool(_) => 1,
        Value::Number(_) => 8,
        Value::String(s) => bytes_size(s.len()),
        Value::Object(m) => bytes_size(struct_size(m)),
        Value::Array(a) => bytes_size(a.iter().map(|v| 1 + bytes_size(value_size(v))).sum()),
    }
}

/// A length-delimited field's payload of `n` bytes with its length (a
/// varint), without the field's tag.
fn bytes_size(n: usize) -> usize {
    let mut len = 1;
    let mut rest = n >> 7;
    while rest > 0 {
        len += 1;
        rest >>= 7;
    }
    len + n
}

/// A string in `context`, at any depth, that reads as a number OpenFGA
/// is slow to refuse (see [`crate::condition::slow_to_refuse`]).
fn slow_number(context: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    use serde_json::Value;
    let mut todo: Vec<&Value> = context.values().collect();
    while let Some(v) = todo.pop() {
        match v {
            Value::Object(m) => todo.extend(m.values()),
            Value::Array(a) => todo.extend(a.iter()),
            Value::String(s) if crate::condition::slow_to_refuse(s) => return Some(s),
            _ => {}
        }
    }
    None
}

/// What in a condition's context fga-wb cannot read back (too deep) or, with
/// `control`, OpenFGA refuses whatever the model (a control character in a
/// key or a string, at any depth), if anything. Without recursion: the
/// context is the caller's, however deep.
fn context_problem(
    context: &serde_json::Map<String, serde_json::Value>,
    control: bool,
) -> Option<String> {
    use serde_json::Value;
    let control = |s: &str| control && s.chars().any(char::is_control);
    let refused = || {
        Some("has a context key or string value with a control character (a newline or a tab, say), which OpenFGA refuses: remove it".to_owned())
    };
    if context.keys().any(|k| control(k)) {
        return refused();
    }
    // Each value with the level it would open if it is an object or array
    // (the context's own is level 1).
    let mut todo: Vec<(&Value, usize)> = context.values().map(|v| (v, 2)).collect();
    while let Some((v, level)) = todo.pop() {
        match v {
            Value::Object(_) | Value::Array(_) if level > MAX_CONTEXT_DEPTH => {
                return Some(format!("has a context nested deeper than {MAX_CONTEXT_DEPTH} levels of objects and arrays; flatten it"));
            }
            Value::Object(m) => {
                if m.keys().any(|k| control(k)) {
                    return refused();
                }
                todo.extend(m.values().map(|v| (v, level + 1)));
            }
            Value::Array(a) => todo.extend(a.iter().map(|v| (v, level + 1))),
            Value::String(s) if control(s) => return refused(),
            _ => {}
        }
    }
    None
}

fn validate_condition_name(name: &str) -> Result<(), TupleError> {
    let f = Field::Condition;
    if name.is_empty() {
        return Err(TupleError::new(
            f,
            name,
            "is empty; give the condition's name",
        ));
    }
    let n = name.chars().count();
    if !(2..=256).contains(&n) || name.chars().any(is_forbidden) {
        return Err(TupleError::new(
            f,
            name,
            "must be a condition name of 2 to 256 characters without spaces or control characters (whitespace)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(user: &str, relation: &str, object: &str) -> TupleError {
        match TupleKey::new(user, relation, object) {
            Ok(t) => panic!("{t} was accepted"),
            Err(e) => e,
        }
    }

    /// `{"k": {"k": ... 1}}` with `levels` objects, the context's own first.
    fn nested_context(levels: usize) -> serde_json::Map<String, serde_json::Value> {
        let mut v = serde_json::json!(1);
        for _ in 1..levels {
            v = serde_json::json!({ "k": v });
        }
        let mut m = serde_json::Map::new();
        m.insert("k".into(), v);
        m
    }

    /// What fga-wb takes it can store and read back; deeper is refused
    /// with a reason, never stored as a condition it could not read.
    #[test]
    fn a_condition_context_too_deep_to_read_back_is_refused() {
        let t = TupleKey::new("user:anne", "viewer", "document:1").expect("valid");
        let ok = t
            .clone()
            .with_condition("in_hours", Some(nested_context(MAX_CONTEXT_DEPTH)))
            .expect("as deep as allowed");
        let stored = serde_json::to_string(&ok.condition).expect("encodes");
        let back: Option<Condition> = serde_json::from_str(&stored).expect("reads back");
        assert_eq!(back, ok.condition);
        let e = t
            .with_condition("in_hours", Some(nested_context(MAX_CONTEXT_DEPTH + 1)))
            .expect_err("one level deeper");
        assert_eq!(e.field, Field::Condition);
        assert!(e.reason.contains("nested deeper than 100"), "{e}");
    }

    /// Without the model (validation off, or not read yet), a grant whose
    /// context holds a number OpenFGA is slow to refuse is refused.
    #[test]
    fn a_context_number_openfga_is_slow_to_refuse_is_refused_without_the_model() {
        let t = TupleKey::new("user:anne", "viewer", "document:1").expect("valid");
        let ctx = |v: serde_json::Value| {
            let mut m = serde_json::Map::new();
            m.insert("x".into(), serde_json::json!({ "deep": [v] }));
            m
        };
        let slow = t
            .clone()
            .with_condition("cond", Some(ctx(serde_json::json!("1p2147483646"))))
            .expect("valid syntax");
        let e = slow.refuse_slow_numbers().expect_err("slow to refuse");
        assert!(e.reason.contains("busy for minutes"), "{e}");
        for fine in ["1e400", "1e650000000", "abc", "12"] {
            let t = t
                .clone()
                .with_condition("cond", Some(ctx(serde_json::json!(fine))))
                .expect("valid syntax");
            t.refuse_slow_numbers().expect(fine);
        }
    }

    #[test]
    fn user_without_type_is_refused() {
        let e = err("123", "viewer", "document:1");
        assert_eq!(e.field, Field::User);
        assert!(e.reason.contains("type:id"), "{e}");
    }

    #[test]
    fn object_with_empty_id_is_refused() {
        let e = err("user:anne", "viewer", "document:");
        assert_eq!(e.field, Field::Object);
        assert!(e.reason.contains("empty id"), "{e}");
    }

    #[test]
    fn relation_with_whitespace_is_refused() {
        let e = err("user:anne", "can view", "document:1");
        assert_eq!(e.field, Field::Relation);
        assert!(e.reason.contains("whitespace"), "{e}");
    }

    #[test]
    fn control_characters_are_refused_and_unicode_spaces_accepted() {
        for bad in [
            "user:a\u{1}b",
            "user:a\u{7f}",
            "user:a\u{85}",
            "user:a\u{b}",
            "user:a\tb",
        ] {
            let e = err(bad, "viewer", "document:1");
            assert_eq!(e.field, Field::User, "{bad:?}");
            assert!(e.reason.contains("control character"), "{e}");
        }
        for ok in [
            "user:a\u{a0}b",
            "user:a\u{3000}",
            "user:a\u{2028}",
            "user:\u{feff}",
        ] {
            assert!(
                TupleKey::new(ok, "viewer", format!("document:{}", &ok[5..])).is_ok(),
                "{ok:?}"
            );
        }
    }

    #[test]
    fn relation_of_51_chars_is_refused() {
        let e = err("user:anne", &"r".repeat(51), "document:1");
        assert_eq!(e.field, Field::Relation);
        assert!(e.reason.contains("at most 50"), "{e}");
        assert!(TupleKey::new("user:anne", "r".repeat(50), "document:1").is_ok());
    }

    #[test]
    fn object_with_space_or_too_long_is_refused() {
        let e = err("user:anne", "viewer", "document:a b");
        assert_eq!(e.field, Field::Object);
        assert!(e.reason.contains("whitespace"), "{e}");
        let long = format!("document:{}", "x".repeat(248));
        let e = err("user:anne", "viewer", &long);
        assert_eq!(e.field, Field::Object);
        assert!(e.reason.contains("at most 256"), "{e}");
        let max = format!("document:{}", "x".repeat(247));
        assert!(TupleKey::new("user:anne", "viewer", max).is_ok());
    }

    #[test]
    fn object_and_relation_limits_count_characters_not_bytes() {
        // 256 characters, 503 bytes: within OpenFGA's limit.
        let wide = format!("document:{}", "é".repeat(247));
        assert!(TupleKey::new("user:anne", "viewer", &wide).is_ok());
        let e = err("user:anne", "viewer", &format!("{wide}é"));
        assert!(e.reason.contains("is 257 characters"), "{e}");
        assert!(TupleKey::new("user:anne", "é".repeat(50), "document:1").is_ok());
        let e = err("user:anne", &"é".repeat(51), "document:1");
        assert_eq!(e.field, Field::Relation);
        assert!(e.reason.contains("is 51 characters"), "{e}");
    }

    #[test]
    fn user_of_513_bytes_is_refused() {
        let user = format!("user:{}", "x".repeat(508));
        let e = err(&user, "viewer", "document:1");
        assert_eq!(e.field, Field::User);
        assert!(e.reason.contains("513 bytes"), "{e}");
        assert!(TupleKey::new(&user[..512], "viewer", "document:1").is_ok());
    }

    #[test]
    fn userset_and_wildcard_users_are_accepted() {
        let t = TupleKey::new("group:eng#member", "viewer", "document:1").unwrap();
        assert_eq!(t.user_relation(), Some("member"));
        let t = TupleKey::new("user:*", "viewer", "document:1").unwrap();
        assert!(t.is_wildcard_user());
    }

    #[test]
    fn a_userset_of_the_tuple_itself_is_refused() {
        let t = TupleKey::new("group:eng#member", "member", "group:eng").unwrap();
        let e = t.validate_for_write().unwrap_err();
        assert_eq!(e.field, Field::User);
        assert!(e.reason.contains("implicit"), "{e}");
        // Nor revoked: OpenFGA always answers it allowed.
        let e = t.validate_for_delete().unwrap_err();
        assert!(e.reason.contains("always answers it allowed"), "{e}");
        assert!(TupleKey::new("group:eng#member", "member", "group:ops").is_ok());
    }

    #[test]
    fn empty_fields_are_named() {
        assert_eq!(err("", "viewer", "document:1").field, Field::User);
        assert_eq!(err("user:anne", "", "document:1").field, Field::Relation);
        assert_eq!(err("user:anne", "viewer", "").field, Field::Object);
        for e in [
            err("", "viewer", "document:1"),
            err("user:anne", "", "document:1"),
            err("user:anne", "viewer", ""),
        ] {
            assert!(e.to_string().contains("is empty"), "{e}");
        }
    }

    #[test]
    fn canonical_form_round_trips() {
        let t: TupleKey = "document:1#viewer@group:eng#member".parse().unwrap();
        assert_eq!(t.object, "document:1");
        assert_eq!(t.relation, "viewer");
        assert_eq!(t.user, "group:eng#member");
        assert_eq!(t.to_string().parse::<TupleKey>().unwrap(), t);
    }

    #[test]
    fn json_is_openfgas_shape() {
        let t = TupleKey::new("user:anne", "viewer", "document:1")
            .unwrap()
            .with_condition("non_expired", None)
            .unwrap();
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user":"user:anne","relation":"viewer","object":"document:1",
                "condition":{"name":"non_expired"}})
        );
    }

    proptest! {
        /// Any strings at all: validation answers, never panics, and what it
        /// accepts has the shape OpenFGA requires.
        #[test]
        fn arbitrary_strings_never_panic(user in ".{0,600}", relation in ".{0,60}", object in ".{0,300}") {
            if let Ok(t) = TupleKey::new(&user, &relation, &object) {
                prop_assert!(t.user.len() <= MAX_USER_BYTES);
                prop_assert!(t.object.contains(':'));
                prop_assert!(!t.relation.chars().any(is_forbidden));
            }
            let _ = format!("{}#{}@{}", object, relation, user).parse::<TupleKey>();
        }

        /// Well-formed tuples are accepted.
        #[test]
        fn well_formed_tuples_are_accepted(
            ty in "[a-z_]{1,20}", id in "[A-Za-z0-9_.|-]{1,40}", rel in "[a-z_]{1,50}",
        ) {
            let user = format!("{ty}:{id}");
            let object = format!("{ty}:{id}");
            prop_assert!(TupleKey::new(&user, &rel, &object).is_ok());
            // A userset of another object (of its own object and relation
            // it would be an implicit tuple, which OpenFGA refuses).
            let userset = format!("{ty}:{id}_group#{rel}");
            prop_assert!(TupleKey::new(&userset, &rel, &object).is_ok());
        }
    }
}
