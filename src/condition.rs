//! Condition contexts as OpenFGA takes them.
//!
//! A conditional tuple may fix some of its condition's parameters in its
//! context. OpenFGA converts each value to its parameter's type when the
//! tuple is written, and refuses the whole tuple when one does not convert
//! or names no parameter. Buffered, such a grant would be acknowledged and
//! then die at flush time, and a revoke it replaced while both were pending
//! would die with it: so the model's parameter types are checked at the
//! call, by OpenFGA's own conversion rules.
//!
//! A number given as a string for a double is worked out exactly as Go's
//! conversion does it (rounded to 64 bits, then exact as a float64 or
//! refused), where Go's own arithmetic is exact (a power of ten up to
//! 10^55 either way). Past that, where an int's answer turns on rounding
//! past 19 significant digits, or a binary exponent is given, a value is
//! let through and OpenFGA decides: refusing what OpenFGA takes would turn
//! valid grants away.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// A condition parameter's type (OpenFGA's `TYPE_NAME_*`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ParamType {
    Any,
    Bool,
    String,
    Int,
    Uint,
    Double,
    Duration,
    Timestamp,
    IpAddress,
    List(Box<ParamType>),
    Map(Box<ParamType>),
    /// A type this version does not know: every value passes, and OpenFGA
    /// decides.
    Unknown,
}

/// Each condition's parameters and their types, from the model.
#[derive(Debug, Default)]
pub(crate) struct Conditions(HashMap<String, HashMap<String, ParamType>>);

impl Conditions {
    /// From a model's `conditions` (name -> `{"parameters": {...}}`).
    pub fn parse(conditions: &Map<String, Value>) -> Conditions {
        let parse_params = |c: &Value| -> HashMap<String, ParamType> {
            c.get("parameters")
                .and_then(Value::as_object)
                .map(|p| {
                    p.iter()
                        .map(|(k, v)| (k.clone(), ParamType::parse(v)))
                        .collect()
                })
                .unwrap_or_default()
        };
        Conditions(
            conditions
                .iter()
                .map(|(name, c)| (name.clone(), parse_params(c)))
                .collect(),
        )
    }

    /// Why OpenFGA would refuse `context` for condition `name`, if it would.
    /// A condition the model does not list is left to OpenFGA.
    pub fn refuses(&self, name: &str, context: &Map<String, Value>) -> Option<String> {
        let params = self.0.get(name)?;
        if context.is_empty() {
            return None;
        }
        if params.is_empty() {
            return Some(
                "takes no parameters, but the context gives some: drop the context".into(),
            );
        }
        // In key order, so the same context always gets the same answer.
        let mut keys: Vec<&String> = context.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let Some(ty) = params.get(key) else {
                let mut known: Vec<&str> = params.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Some(format!(
                    "has context parameter {key:?}, which it does not declare (its parameters: {})",
                    known.join(", ")
                ));
            };
            if let Some(why) = ty.refuses(&context[key]) {
                return Some(format!("has context parameter {key:?} {why}"));
            }
        }
        None
    }
}

impl ParamType {
    /// From a `ConditionParamTypeRef` (`{"type_name", "generic_types"}`).
    fn parse(v: &Value) -> ParamType {
        let generic = || {
            v.get("generic_types")
                .and_then(Value::as_array)
                .and_then(|g| g.first())
                .map_or(ParamType::Unknown, ParamType::parse)
        };
        match v.get("type_name").and_then(Value::as_str).unwrap_or("") {
            "TYPE_NAME_ANY" => ParamType::Any,
            "TYPE_NAME_BOOL" => ParamType::Bool,
            "TYPE_NAME_STRING" => ParamType::String,
            "TYPE_NAME_INT" => ParamType::Int,
            "TYPE_NAME_UINT" => ParamType::Uint,
            "TYPE_NAME_DOUBLE" => ParamType::Double,
            "TYPE_NAME_DURATION" => ParamType::Duration,
            "TYPE_NAME_TIMESTAMP" => ParamType::Timestamp,
            "TYPE_NAME_IPADDRESS" => ParamType::IpAddress,
            "TYPE_NAME_LIST" => ParamType::List(Box::new(generic())),
            "TYPE_NAME_MAP" => ParamType::Map(Box::new(generic())),
            _ => ParamType::Unknown,
        }
    }

    /// What it is, to finish "must be ...".
    fn what(&self) -> String {
        match self {
            ParamType::Any | ParamType::Unknown => "any value".into(),
            ParamType::Bool => "a boolean (true or false)".into(),
            ParamType::String => "a string".into(),
            ParamType::Int => "an integer (a whole number, or a string of one)".into(),
            ParamType::Uint => {
                "an unsigned integer (a whole number from 0, or a string of one)".into()
            }
            ParamType::Double => "a number (or a string of one)".into(),
            ParamType::Duration => "a duration string such as \"1h30m\" or \"250ms\"".into(),
            ParamType::Timestamp => {
                "an RFC 3339 timestamp string such as \"2024-01-31T09:00:00Z\"".into()
            }
            ParamType::IpAddress => {
                "an IP address string such as \"10.0.0.1\" or \"::1\" (no prefix length)".into()
            }
            ParamType::List(t) => format!("a list of {}", t.what_item()),
            ParamType::Map(t) => format!("an object (a map) of {}", t.what_item()),
        }
    }

    fn what_item(&self) -> String {
        match self {
            ParamType::Any | ParamType::Unknown => "any values".into(),
            t => format!("values each {}", t.what()),
        }
    }

    /// Why OpenFGA would not convert `v` to this type, if it would not:
    /// phrased to follow "has context parameter ...".
    fn refuses(&self, v: &Value) -> Option<String> {
        let fits = match (self, v) {
            (ParamType::Any | ParamType::Unknown, _) => true,
            (ParamType::Bool, Value::Bool(_)) => true,
            (ParamType::String, Value::String(_)) => true,
            (ParamType::Int, Value::Number(n)) => n.as_f64().is_some_and(|f| f.fract() == 0.0),
            (ParamType::Uint, Value::Number(n)) => {
                n.as_f64().is_some_and(|f| f.fract() == 0.0 && f >= 0.0)
            }
            (ParamType::Double, Value::Number(_)) => true,
            (ParamType::Int | ParamType::Uint | ParamType::Double, Value::String(s)) => {
                numeric_string_fits(self, s)
            }
            (ParamType::Duration, Value::String(s)) => go_duration_parses(s),
            (ParamType::Timestamp, Value::String(s)) => go_rfc3339_parses(s),
            (ParamType::IpAddress, Value::String(s)) => ip_parses(s),
            (ParamType::List(t), Value::Array(items)) => {
                return items.iter().enumerate().find_map(|(i, item)| {
                    t.refuses(item)
                        .map(|why| format!("= {}: item {i} {why}", short(v)))
                });
            }
            (ParamType::Map(t), Value::Object(m)) => {
                return m.iter().find_map(|(k, item)| {
                    t.refuses(item)
                        .map(|why| format!("= {}: key {k:?} {why}", short(v)))
                });
            }
            _ => false,
        };
        (!fits).then(|| format!("= {}, which must be {}", short(v), self.what()))
    }
}

/// A value as given, cut short for an error message.
fn short(v: &Value) -> String {
    const MAX: usize = 60;
    let s = v.to_string();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Whether OpenFGA's conversion of a string to a number (Go's
/// `big.ParseFloat(s, 10, 64, 0)`, then an exact `Float64()` for a double,
/// a whole-number check for int and uint) may take `s`. Int and uint
/// strings whose answer turns on rounding at 64 bits (more than 19
/// significant digits) pass, as do binary exponents.
fn numeric_string_fits(ty: &ParamType, s: &str) -> bool {
    let Some(n) = GoFloat::parse(s) else {
        return false;
    };
    if !n.exponent_fits {
        return false;
    }
    // Past Go's own range, its big.Float is an exact infinity or zero.
    let (inf, zero) = match n.past_go_range {
        true => (n.log2 > 0.0, n.log2 < 0.0),
        false => (n.inf, n.zero()),
    };
    match ty {
        // An infinity or a zero converts exactly.
        ParamType::Double if inf || zero => true,
        // Past a double's range either way (at or above 10^309, below
        // 10^-324): +Inf or 0, inexact, refused however Go rounds. OpenFGA
        // says so with the value in decimal, which for a large exponent
        // keeps its CPU busy for minutes, past the request's deadline (a
        // 500 that a retry repeats).
        ParamType::Double if n.exp2 && !(-1076.0..1025.0).contains(&n.log2) => false,
        ParamType::Double if !n.exp2 && n.out_of_double_range() => false,
        // A binary exponent, or a power of five Go works out only
        // approximately (past 5^55), is OpenFGA's call.
        ParamType::Double if n.exp2 || n.exp5.unsigned_abs() > 55 => true,
        ParamType::Double => n.exact_double(),
        // Not a whole number: infinities, and fractions that no rounding
        // can make whole (with a binary exponent: below a half).
        _ if inf || n.near_go_edge => false,
        _ if zero => true,
        ParamType::Uint if n.negative => false,
        // Below a half, no rounding makes it whole (however many digits:
        // OpenFGA's refusal would spell it out).
        _ if n.log2 < -1.0 => false,
        _ if n.exp2 => true,
        _ => n.may_be_whole(),
    }
}

/// Whether `s`, read as a number (as OpenFGA reads a numeric parameter's
/// string), is one whose refusal keeps OpenFGA busy for long: finite in
/// Go's `big.Float` and more than 100,000 powers of two from one, which
/// OpenFGA's error spells out in decimal. Refused in a grant checked
/// without the model, whose parameters' types are unknown (see
/// `TupleKey::refuse_slow_numbers`).
pub(crate) fn slow_to_refuse(s: &str) -> bool {
    GoFloat::parse(s).is_some_and(|n| {
        n.exponent_fits && !n.inf && !n.zero() && !n.past_go_range && n.log2.abs() > 100_000.0
    })
}

/// The parts of a decimal string in Go's `big.Float` syntax (base 10): sign,
/// `digits[.digits]` or `.digits`, an optional `e`/`E` (decimal) or `p`/`P`
/// (binary) exponent, or `inf`/`Inf`.
struct GoFloat {
    negative: bool,
    inf: bool,
    /// Significant digits: the mantissa's without leading or trailing zeros.
    significant: usize,
    /// The power of ten of the last significant digit (the exponent, less
    /// the digits after the point, plus the trailing zeros dropped): the
    /// value is whole when it is at least 0. Without a binary exponent.
    last_digit: i64,
    /// A binary exponent (`p`) was given.
    exp2: bool,
    /// The significant digits themselves (without a binary exponent).
    digits: String,
    /// The power of ten Go applies to the digits as written (the exponent
    /// less every digit after the point, trailing zeros too): Go's
    /// conversion is exact up to 5^55, approximate past it.
    exp5: i64,
    /// Go's `big.Float` takes the exponent (see [`go_exponent_fits`]).
    exponent_fits: bool,
    /// About log2 of the value's magnitude (not for zero or infinity).
    log2: f64,
    /// Past the exponents Go's `big.Float` holds, or its power of five
    /// is, with a margin (see [`go_extent`]).
    past_go_range: bool,
    /// Within that margin of Go's range's edge, either way.
    near_go_edge: bool,
}

/// Beyond this power of two, Go's `big.Float` overflows (to an infinity)
/// or underflows (to a zero): its exponent is an int32. With a margin: a
/// value at the edge counts as within, and so as out of a double's range
/// (refused rather than left to a conversion that may keep OpenFGA busy).
const GO_EDGE: f64 = 2_147_483_648.0 + 64.0;

/// How far from one Go's `big.Float` parse of a nonzero value with about
/// `log2` for its magnitude and a power of five `exp5` to apply goes, in
/// powers of two: the larger of the result's and the power of five's
/// alone. At [`GO_EDGE`] or past, the parse ends past Go's range (the
/// power of five alone overflowing makes the value an infinity, or a zero
/// if divided by it); within 128 below, near its edge, where fga-wb cannot
/// tell an infinity or zero from a finite value: an int or uint there is
/// refused (an infinity is no whole number; a finite tiny one is refused
/// slowly).
fn go_extent(log2: f64, exp5: i64) -> f64 {
    ((exp5 as f64).abs() * 5f64.log2()).max(log2.abs())
}

/// About log2 of the whole number of the decimal digits `whole` (no
/// leading zeros, at least one digit), from its leading 17 digits.
fn log2_of_digits(whole: &str) -> f64 {
    let lead = whole.len().min(17);
    let rest = (whole.len() - lead) as f64;
    let lead: f64 = whole[..lead].parse().unwrap_or(1.0);
    rest.mul_add(std::f64::consts::LOG2_10, lead.log2())
}

/// Whether Go's `big.Float` takes a mantissa whose whole number (every
/// digit, the point left out) has about `log2_int` for its log2, `frac` of
/// its digits after the point, with exponent `exp`: the binary exponent it
/// works out (the whole number's bit length, less `frac`, plus `exp`, in
/// an int64 that wraps) must fit an int32, or the parse fails ("exponent
/// overflow") and OpenFGA refuses the value. The bit length may be one off
/// for a mantissa within a rounding of a power of two, which matters only
/// at the exponent's very edge.
fn go_exponent_fits(log2_int: f64, frac: i64, exp: i64) -> bool {
    let bits = log2_int.floor() as i64 + 1;
    i32::try_from(bits.wrapping_sub(frac).wrapping_add(exp)).is_ok()
}

impl GoFloat {
    fn parse(s: &str) -> Option<GoFloat> {
        let (negative, rest) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        if rest == "inf" || rest == "Inf" {
            return Some(GoFloat {
                negative,
                inf: true,
                significant: 0,
                last_digit: 0,
                exp2: false,
                digits: String::new(),
                exp5: 0,
                exponent_fits: true,
                log2: f64::INFINITY,
                past_go_range: false,
                near_go_edge: false,
            });
        }
        let (mantissa, exponent) = match rest.find(['e', 'E', 'p', 'P']) {
            Some(i) => (&rest[..i], Some((&rest[i..i + 1], &rest[i + 1..]))),
            None => (rest, None),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if !digits(int_part) || !digits(frac_part) || (int_part.is_empty() && frac_part.is_empty())
        {
            return None;
        }
        // Go reads the exponent as an int64, and refuses one beyond it.
        let (exp, exp2) = match exponent {
            None => (0, false),
            Some((kind, e)) => {
                let body = e.strip_prefix(['+', '-']).unwrap_or(e);
                if body.is_empty() || !digits(body) {
                    return None;
                }
                (e.parse::<i64>().ok()?, kind == "p" || kind == "P")
            }
        };
        let all = format!("{int_part}{frac_part}");
        let trimmed = all.trim_end_matches('0');
        let dropped = all.len() - trimmed.len();
        let digits = trimmed.trim_start_matches('0').to_owned();
        let significant = digits.len();
        let shift = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let whole = all.trim_start_matches('0');
        let frac = shift(frac_part.len());
        // Zero: any exponent leaves it zero.
        let log2_int = match whole.is_empty() {
            true => 0.0,
            false => log2_of_digits(whole),
        };
        // The power of ten as written; Go's power of five is that, or with
        // a binary exponent only the digits after the point.
        let exp5 = exp.saturating_sub(frac);
        let go_exp5 = match exp2 {
            true => frac.saturating_neg(),
            false => exp5,
        };
        let log2 = match exp2 {
            true => log2_int - frac as f64 * std::f64::consts::LOG2_10 + exp as f64,
            false => (exp5 as f64).mul_add(std::f64::consts::LOG2_10, log2_int),
        };
        let extent = match whole.is_empty() {
            true => 0.0,
            false => go_extent(log2, go_exp5),
        };
        Some(GoFloat {
            negative,
            inf: false,
            exponent_fits: whole.is_empty() || go_exponent_fits(log2_int, frac, exp),
            log2,
            past_go_range: extent >= GO_EDGE,
            near_go_edge: (GO_EDGE - 128.0..GO_EDGE).contains(&extent),
            exp5,
            digits,
            significant,
            last_digit: match exp2 {
                true => 0,
                false => exp5.saturating_add(shift(dropped)),
            },
            exp2,
        })
    }

    fn zero(&self) -> bool {
        !self.inf && self.significant == 0
    }

    /// Whether the value lies past a float64's range, and so converts to
    /// +Inf or 0 inexactly: its leading digit's power of ten at 309 or
    /// more (above the largest, 1.8e308), or at -325 or less (below half
    /// the smallest, 4.9e-324). Not for a zero, nor for a value past Go's
    /// own `big.Float` range (see [`go_extent`]): that one becomes an
    /// infinity or a zero first, which converts exactly, and OpenFGA takes
    /// it.
    fn out_of_double_range(&self) -> bool {
        let leading = self
            .last_digit
            .saturating_add(self.significant as i64)
            .saturating_sub(1);
        !(-324..309).contains(&leading)
    }

    /// Whether the value, rounded to 64 bits (to nearest, ties to even),
    /// is a float64 exactly, as Go's `Float64()` must find it for OpenFGA
    /// to take it. That holds when the value rounds to the float64 nearest
    /// it at 64 bits: when it lies within half a 64-bit step of it (that
    /// float64's mantissa ends in zeros, so a tie goes to it). Not for a
    /// binary exponent.
    fn exact_double(&self) -> bool {
        if self.zero() {
            return true;
        }
        // The nearest float64 (Rust's parse rounds correctly), of the
        // digits alone: the sign changes nothing.
        let Ok(f) = format!("{}e{}", self.digits, self.last_digit).parse::<f64>() else {
            return false;
        };
        if f == 0.0 || f.is_infinite() {
            return false;
        }
        // f = mant * 2^exp, its top bit at 2^top.
        let bits = f.to_bits();
        let raw_exp = ((bits >> 52) & 0x7ff) as i64;
        let (mant, exp) = match raw_exp {
            0 => (bits & ((1 << 52) - 1), -1074),
            e => ((bits & ((1 << 52) - 1)) | (1 << 52), e - 1075),
        };
        let top = exp + 63 - i64::from(mant.leading_zeros());
        // In units of 2^base, the smallest step below: f, and half a
        // 64-bit step above and below it (half as far below a power of two).
        let base = top - 65;
        let at = u128::from(mant) << (exp - base);
        let above = at + (1u128 << (top - 64 - base));
        let below = match mant.is_power_of_two() {
            true => at - 1,
            false => at - (1u128 << (top - 64 - base)),
        };
        let x = Decimal {
            digits: &self.digits,
            exp10: self.last_digit,
        };
        x.cmp_binary(below, base).is_ge() && x.cmp_binary(above, base).is_le()
    }

    /// Whether the value may be a whole number after Go rounds it to 64
    /// bits: certainly not when it has at most 19 significant digits (less
    /// than 2^64) and its last one is below the units.
    fn may_be_whole(&self) -> bool {
        self.zero() || self.exp2 || self.significant > 19 || self.last_digit >= 0
    }
}

/// A decimal `digits` * 10^`exp10`, compared exactly with binary numbers.
struct Decimal<'a> {
    digits: &'a str,
    exp10: i64,
}

impl Decimal<'_> {
    /// How this compares with `n` * 2^`exp2`: both sides made whole, in
    /// arbitrary precision. Only called with exponents a float64's range
    /// bounds (the value is a finite, nonzero float64 when rounded).
    fn cmp_binary(&self, n: u128, exp2: i64) -> std::cmp::Ordering {
        let mut lhs = BigUint::from_decimal(self.digits);
        let mut rhs = BigUint::from_u128(n);
        match self.exp10 {
            e if e >= 0 => lhs.mul_pow10(e.unsigned_abs()),
            e => rhs.mul_pow10(e.unsigned_abs()),
        }
        match exp2 {
            e if e >= 0 => rhs.shl(e.unsigned_abs()),
            e => lhs.shl(e.unsigned_abs()),
        }
        lhs.cmp(&rhs)
    }
}

/// Just enough of an unsigned big integer for [`Decimal::cmp_binary`]:
/// little-endian 32-bit limbs, no trailing zero limbs.
#[derive(PartialEq, Eq)]
struct BigUint(Vec<u32>);

impl BigUint {
    fn from_u128(mut n: u128) -> BigUint {
        let mut v = Vec::new();
        while n > 0 {
            v.push(n as u32);
            n >>= 32;
        }
        BigUint(v)
    }

    fn from_decimal(digits: &str) -> BigUint {
        let mut n = BigUint(Vec::new());
        // Nine digits at a time: each step one multiply over the limbs.
        for chunk in digits.as_bytes().chunks(9) {
            let (mut mul, mut add) = (1u32, 0u32);
            for d in chunk {
                mul *= 10;
                add = add * 10 + u32::from(d - b'0');
            }
            n.mul_add(mul, add);
        }
        n
    }

    fn mul_add(&mut self, mul: u32, add: u32) {
        let mut carry = u64::from(add);
        for limb in &mut self.0 {
            let v = u64::from(*limb) * u64::from(mul) + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry > 0 {
            self.0.push(carry as u32);
        }
    }

    fn mul_pow10(&mut self, mut e: u64) {
        while e > 0 {
            let step = e.min(9);
            self.mul_add(10u32.pow(step as u32), 0);
            e -= step;
        }
    }

    fn shl(&mut self, bits: u64) {
        if self.0.is_empty() {
            return;
        }
        let (limbs, rest) = ((bits / 32) as usize, (bits % 32) as u32);
        if rest > 0 {
            let mut carry = 0u32;
            for limb in &mut self.0 {
                let v = (u64::from(*limb) << rest) | u64::from(carry);
                *limb = v as u32;
                carry = (v >> 32) as u32;
            }
            if carry > 0 {
                self.0.push(carry);
            }
        }
        self.0.splice(0..0, std::iter::repeat_n(0, limbs));
    }
}

impl Ord for BigUint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
    }
}

impl PartialOrd for BigUint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Whether Go's `time.ParseDuration` takes `s`:
/// `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`, with known units and no
/// overflow of an `int64` of nanoseconds.
fn go_duration_parses(s: &str) -> bool {
    const UNITS: [(&str, u64); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("\u{b5}s", 1_000),
        ("\u{3bc}s", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    const LIMIT: u64 = 1 << 63;
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return true;
    }
    if rest.is_empty() {
        return false;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits_end = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n = digits_end(rest);
        let whole = &rest[..n];
        rest = &rest[n..];
        let mut fraction = "";
        if let Some(after) = rest.strip_prefix('.') {
            let m = digits_end(after);
            fraction = &after[..m];
            rest = &after[m..];
        }
        if whole.is_empty() && fraction.is_empty() {
            return false;
        }
        let unit_end = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let Some(&(_, unit)) = UNITS.iter().find(|(u, _)| *u == &rest[..unit_end]) else {
            return false;
        };
        rest = &rest[unit_end..];
        // Go's arithmetic, step for step (a uint64, and a float64 for the
        // fraction), so that the same strings overflow.
        let mut v: u64 = 0;
        for b in whole.bytes() {
            if v > LIMIT / 10 {
                return false;
            }
            v = v * 10 + u64::from(b - b'0');
            if v > LIMIT {
                return false;
            }
        }
        if v > LIMIT / unit {
            return false;
        }
        v *= unit;
        let (mut f, mut scale, mut overflow) = (0u64, 1f64, false);
        for b in fraction.bytes() {
            // Go skips the digits past an overflow.
            if overflow || f > (LIMIT - 1) / 10 {
                overflow = true;
                continue;
            }
            let y = f * 10 + u64::from(b - b'0');
            if y > LIMIT {
                overflow = true;
                continue;
            }
            f = y;
            scale *= 10.0;
        }
        if f > 0 {
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > LIMIT {
                return false;
            }
        }
        total = total.wrapping_add(v);
        if total > LIMIT {
            return false;
        }
    }
    negative || total < LIMIT
}

/// Whether Go's `time.Parse(time.RFC3339, s)` takes `s`:
/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±hh:mm)` with the hour in one or two
/// digits, in range, and the day within its month.
fn go_rfc3339_parses(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let parsed = (|| {
        let year = num(0, 4)?;
        (b.get(4) == Some(&b'-')).then_some(())?;
        let month = num(5, 2).filter(|m| (1..=12).contains(m))?;
        (b.get(7) == Some(&b'-')).then_some(())?;
        let day = num(8, 2).filter(|d| (1..=31).contains(d))?;
        (b.get(10) == Some(&b'T')).then_some(())?;
        // One digit or two.
        let hour_len = if num(12, 1).is_some() { 2 } else { 1 };
        num(11, hour_len).filter(|h| *h < 24)?;
        let mut i = 11 + hour_len;
        (b.get(i) == Some(&b':')).then_some(())?;
        num(i + 1, 2).filter(|m| *m < 60)?;
        (b.get(i + 3) == Some(&b':')).then_some(())?;
        num(i + 4, 2).filter(|s| *s < 60)?;
        i += 6;
        if matches!(b.get(i), Some(b'.' | b',')) && num(i + 1, 1).is_some() {
            i += 1;
            while num(i, 1).is_some() {
                i += 1;
            }
        }
        let zone_ok = match b.get(i..)? {
            [b'Z'] => true,
            [sign, ..] if (*sign == b'+' || *sign == b'-') && b.len() == i + 6 => {
                b[i + 3] == b':'
                    && num(i + 1, 2).is_some_and(|h| h <= 24)
                    && num(i + 4, 2).is_some_and(|m| m <= 60)
            }
            _ => false,
        };
        zone_ok.then_some((year, month, day))
    })();
    parsed.is_some_and(|(year, month, day)| day <= days_in(month, year))
}

fn days_in(month: u32, year: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Whether Go's `netip.ParseAddr` takes `s`: an IPv4 address in four
/// decimal parts without leading zeros, or an IPv6 address, optionally with
/// a non-empty zone (`%eth0`). No prefix length.
fn ip_parses(s: &str) -> bool {
    match s.find(['.', ':', '%']).map(|i| s.as_bytes()[i]) {
        Some(b'.') => s.parse::<std::net::Ipv4Addr>().is_ok(),
        Some(b':') => {
            let addr = match s.split_once('%') {
                Some((_, "")) => return false,
                Some((a, _)) => a,
                None => s,
            };
            addr.parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refuses(ty: ParamType, v: Value) -> bool {
        ty.refuses(&v).is_some()
    }

    #[test]
    fn numbers_convert_as_openfga_converts_them() {
        use ParamType::*;
        assert!(!refuses(Int, json!(3)));
        assert!(!refuses(Int, json!(3.0)));
        assert!(refuses(Int, json!(3.5)));
        assert!(!refuses(Int, json!("-12")));
        assert!(!refuses(Int, json!("1.50e1")));
        assert!(!refuses(Int, json!("150e-1")));
        assert!(!refuses(Int, json!("1000e-3")));
        assert!(refuses(Int, json!("1e-99999999999999999999")));
        assert!(refuses(Int, json!("1.5")));
        assert!(refuses(Int, json!("Inf")));
        assert!(refuses(Int, json!("12abc")));
        assert!(refuses(Int, json!("")));
        assert!(refuses(Int, json!(true)));
        assert!(!refuses(Uint, json!(0)));
        assert!(!refuses(Uint, json!("-0")));
        assert!(refuses(Uint, json!(-1)));
        assert!(refuses(Uint, json!("-1")));
        assert!(!refuses(Double, json!(0.1)));
        assert!(!refuses(Double, json!("-Inf")));
        assert!(refuses(Double, json!("0x10")));
        // Past a double's range either way: +Inf or 0, inexact.
        assert!(refuses(Double, json!("1e400")));
        assert!(refuses(Double, json!("-12.5e320")));
        assert!(refuses(Double, json!("1e-400")));
        assert!(refuses(Double, json!("0.001e-322")));
        assert!(!refuses(Double, json!("0e999")));
        // Past Go's own big.Float range: an exact infinity, or zero.
        assert!(!refuses(Double, json!("1e650000000")));
        assert!(!refuses(Double, json!("-1e-1000000000")));
        // Past an int32 as big.Float's binary exponent: refused.
        assert!(refuses(Double, json!("1e-9223372036854775808")));
        assert!(refuses(Double, json!("-0.1e-9223372036854775807")));
        assert!(refuses(Double, json!("1e2147483647")));
        assert!(refuses(Int, json!("1e-2147483650")));
        assert!(refuses(Double, json!("1p2147483647")));
        // Within Go's range, past a double's: refused (OpenFGA's refusal
        // spells the value out in decimal, for minutes).
        assert!(refuses(Double, json!("1p2147483646")));
        assert!(refuses(Double, json!("1p-100000")));
        assert!(!refuses(Double, json!("1p1000")));
        assert!(refuses(Double, json!("1e600000000")));
        assert!(refuses(Double, json!("1e-640000000")));
        // Past Go's range as a whole number: an infinity is none, a zero is.
        assert!(refuses(Int, json!("1e650000000")));
        assert!(!refuses(Int, json!("1e-1000000000")));
        assert!(slow_to_refuse("1p2147483646") && slow_to_refuse("-1.5e-600000000"));
        assert!(!slow_to_refuse("1e400") && !slow_to_refuse("1e650000000"));
        assert!(!slow_to_refuse("abc") && !slow_to_refuse("0e-2000000") && !slow_to_refuse("Inf"));
        assert!(refuses(Int, json!("1e646457000")));
        assert!(refuses(Int, json!("1e-646457000")));
        assert!(refuses(Int, json!("1p-3")));
        assert!(refuses(Int, json!("12345678901234567890123e-500000000")));
        assert!(refuses(Uint, json!("0.1000000000000000000001")));
        assert!(!refuses(Int, json!("0.99999999999999999999999")));
        assert!(!refuses(Int, json!("1p3")));
        assert!(!refuses(Double, json!("0e-9223372036854775808")));
        assert!(!refuses(Double, json!("1e300")));
        assert!(refuses(Double, json!(null)));
        // At the edge of 64-bit rounding: OpenFGA decides.
        assert!(!refuses(Int, json!("1.00000000000000000000001")));
    }

    #[test]
    fn durations_timestamps_and_addresses_parse_as_go_parses_them() {
        use ParamType::*;
        for ok in [
            "0",
            "-0",
            "+0",
            "1h30m",
            "1.5s",
            "1.s",
            ".5ms",
            "300\u{b5}s",
            "-2h",
            // Go's float64 rounds this fraction down, to just within 2^63.
            "9223372036853779661ns0.99614700000000000ms",
        ] {
            assert!(!refuses(Duration, json!(ok)), "{ok}");
        }
        for bad in ["", "1", "1d", " 1h", "h", ".s", "2562048h", "1h 30m"] {
            assert!(refuses(Duration, json!(bad)), "{bad}");
        }
        for ok in [
            "2024-01-31T09:00:00Z",
            "2024-02-29T23:59:59.123456789+02:00",
            "2024-01-31T9:00:00Z",
            "2024-01-31T09:00:00,5-24:00",
        ] {
            assert!(!refuses(Timestamp, json!(ok)), "{ok}");
        }
        for bad in [
            "2024-01-31",
            "2023-02-29T00:00:00Z",
            "2024-01-31T24:00:00Z",
            "2024-01-31t09:00:00Z",
            "2024-01-31T09:00:00",
            "2024-01-31T09:00:00z",
            "2024-01-31 09:00:00Z",
            "1706691600",
        ] {
            assert!(refuses(Timestamp, json!(bad)), "{bad}");
        }
        for ok in ["10.0.0.1", "::1", "fe80::1%eth0", "::ffff:10.0.0.1"] {
            assert!(!refuses(IpAddress, json!(ok)), "{ok}");
        }
        for bad in [
            "10.0.0.0/8",
            "010.0.0.1",
            "localhost",
            "fe80::1%",
            "%eth0",
            "1.2.3",
        ] {
            assert!(refuses(IpAddress, json!(bad)), "{bad}");
        }
    }

    #[test]
    fn lists_and_maps_convert_each_item() {
        let list = ParamType::List(Box::new(ParamType::Int));
        assert!(!refuses(list.clone(), json!([1, "2"])));
        let why = list.refuses(&json!([1, 2.5])).unwrap_or_default();
        assert!(why.contains("item 1"), "{why}");
        assert!(refuses(list, json!(1)));
        let map = ParamType::Map(Box::new(ParamType::String));
        assert!(!refuses(map.clone(), json!({"a": "b"})));
        assert!(refuses(map, json!({"a": 1})));
    }

    #[test]
    fn a_context_is_checked_against_its_condition() {
        let model = json!({
            "in_hours": {"parameters": {
                "hour": {"type_name": "TYPE_NAME_INT"},
                "zones": {"type_name": "TYPE_NAME_LIST", "generic_types": [{"type_name": "TYPE_NAME_STRING"}]},
            }},
            "plain": {"expression": "true"},
        });
        let c = Conditions::parse(model.as_object().unwrap_or(&Map::new()));
        let ctx = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(c.refuses("in_hours", &ctx(json!({"hour": 9}))), None);
        assert_eq!(c.refuses("in_hours", &ctx(json!({}))), None);
        assert_eq!(c.refuses("unlisted", &ctx(json!({"x": 1}))), None);
        let why = c.refuses("in_hours", &ctx(json!({"hour": "nine"})));
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("\"hour\"") && w.contains("an integer")),
            "{why:?}"
        );
        let why = c.refuses("in_hours", &ctx(json!({"minute": 1})));
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("\"minute\"") && w.contains("hour, zones")),
            "{why:?}"
        );
        let why = c.refuses("plain", &ctx(json!({"x": 1})));
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("takes no parameters")),
            "{why:?}"
        );
    }
}
