//! Reading request bodies in one pass, without copies: each key goes
//! straight to its field, unknown keys are skipped unread, and lists are
//! capped while they are read.
//!
//! NOTE: written by hand because serde's `flatten` and `untagged` (what
//! derive offers for fields shared by two request types and for values of
//! several shapes) first copy the value into a tree of serde's own
//! `Content`, unknown fields included: a 4 MiB body of junk fields took
//! tens of times its size in memory before a single check ran.

use std::fmt;

use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::Value;

use super::{Content, MAX_STOPS, Part, Prompt, Stop};

/// A type read from a JSON object key by key.
pub(crate) trait Fields: Default {
    /// What the object is, for error messages.
    const WHAT: &'static str;

    /// Reads `key`'s value into its field and returns the field's name;
    /// `None` if the key is not one of ours (its value is then skipped).
    fn read<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error>;

    /// After the last key, with the fields that were given.
    fn finish<E: de::Error>(&self, _given: &[&'static str]) -> Result<(), E> {
        Ok(())
    }
}

/// Reads the value of a field whose `null` means "not given".
pub(crate) fn value<'de, A: MapAccess<'de>, T: Deserialize<'de> + Default>(
    map: &mut A,
) -> Result<T, A::Error> {
    Ok(map.next_value::<Option<T>>()?.unwrap_or_default())
}

/// `match`es a key against fields read with [`value`].
macro_rules! read_fields {
    ($self:ident, $key:ident, $map:ident, [$($field:ident),* $(,)?]) => {
        match $key {
            $(stringify!($field) => {
                $self.$field = $crate::openai::de::value($map)?;
                Some(stringify!($field))
            })*
            _ => None,
        }
    };
}
pub(crate) use read_fields;

/// Deserializes a [`Fields`] type from a JSON object; a field given twice
/// is an error (which of the two would count is anyone's guess).
pub(crate) fn fields<'de, D: Deserializer<'de>, T: Fields>(d: D) -> Result<T, D::Error> {
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Fields> Visitor<'de> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{} object", T::WHAT)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
            let mut out = T::default();
            let mut given: Vec<&'static str> = Vec::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                match out.read(&key, &mut map)? {
                    Some(name) if given.contains(&name) => {
                        return Err(de::Error::duplicate_field(name));
                    }
                    Some(name) => given.push(name),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            out.finish(&given)?;
            Ok(out)
        }
    }
    d.deserialize_map(V(std::marker::PhantomData))
}

/// A list of at most `N` items (or `null`), refused as it is read past
/// that.
pub(crate) struct Capped<T, const N: usize>(pub(crate) Option<Vec<T>>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        capped_seq::<D, T, N>(d).map(Capped)
    }
}

/// An object of at most `N` entries (or `null`), kept in order, duplicates
/// and all (the checks see every key); refused as it is read past that.
pub(crate) struct CappedMap<T, const N: usize>(pub(crate) Option<Vec<(String, T)>>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for CappedMap<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        capped_map::<D, T, N>(d).map(CappedMap)
    }
}

/// A list whose first `N` items are kept and the rest only counted
/// (`null`: none).
pub(crate) struct Counted<T, const N: usize> {
    pub(crate) kept: Vec<T>,
    pub(crate) given: usize,
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Counted<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Counted<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list, or null")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Counted {
                    kept: Vec::new(),
                    given: 0,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut kept = Vec::new();
                let mut given = 0;
                loop {
                    let more = if kept.len() < N {
                        seq.next_element::<T>()?.map(|x| kept.push(x)).is_some()
                    } else {
                        seq.next_element::<IgnoredAny>()?.is_some()
                    };
                    if !more {
                        break;
                    }
                    given += 1;
                }
                Ok(Counted { kept, given })
            }
        }
        d.deserialize_any(V::<T, N>(std::marker::PhantomData))
    }
}

fn capped_seq<'de, D, T, const N: usize>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
        type Value = Option<Vec<T>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {N} items, or null")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(de::Error::custom(format!("at most {N} items")));
                }
                out.push(x);
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(V::<T, N>(std::marker::PhantomData))
}

fn capped_map<'de, D, T, const N: usize>(d: D) -> Result<Option<Vec<(String, T)>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
        type Value = Option<Vec<(String, T)>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an object of at most {N} entries, or null")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(kv) = map.next_entry()? {
                if out.len() == N {
                    return Err(de::Error::custom(format!("at most {N} entries")));
                }
                out.push(kv);
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(V::<T, N>(std::marker::PhantomData))
}

/// A parameter's value kept only as far as it takes to tell a small
/// "off" value (`[]`, `"none"`, `{"type": "text"}`, ...) from anything
/// else: at most [`Given::NODES`] values and strings of at most
/// [`Given::STR`] bytes; a larger value is read through and forgotten.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Given {
    /// Small enough to keep.
    Small(Value),
    /// Too large to be any "off" value.
    Large,
}

impl Given {
    const NODES: usize = 16;
    const STR: usize = 64;

    /// Whether it is one of `offs` (`null` always is).
    pub(crate) fn is_off(&self, offs: &[Value]) -> bool {
        matches!(self, Given::Small(v) if v.is_null() || offs.contains(v))
    }
}

impl<'de> Deserialize<'de> for Given {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut budget = Given::NODES;
        Ok(
            match (Bounded {
                budget: &mut budget,
            })
            .deserialize(d)?
            {
                Some(v) => Given::Small(v),
                None => Given::Large,
            },
        )
    }
}

/// Reads a value into a tree while `budget` lasts; past it, reads the rest
/// without keeping it and gives `None`.
struct Bounded<'b> {
    budget: &'b mut usize,
}

impl Bounded<'_> {
    fn take(&mut self) -> bool {
        if *self.budget == 0 {
            return false;
        }
        *self.budget -= 1;
        true
    }
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Option<Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(mut self) -> Result<Self::Value, E> {
        Ok(self.take().then_some(Value::Null))
    }
    fn visit_bool<E>(mut self, v: bool) -> Result<Self::Value, E> {
        Ok(self.take().then_some(Value::Bool(v)))
    }
    fn visit_i64<E>(mut self, v: i64) -> Result<Self::Value, E> {
        Ok(self.take().then_some(Value::from(v)))
    }
    fn visit_u64<E>(mut self, v: u64) -> Result<Self::Value, E> {
        Ok(self.take().then_some(Value::from(v)))
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<Self::Value, E> {
        Ok(self.take().then_some(Value::from(v)))
    }
    fn visit_str<E>(mut self, v: &str) -> Result<Self::Value, E> {
        Ok((self.take() && v.len() <= Given::STR).then(|| Value::from(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = self.take().then(Vec::new);
        while let Some(item) = match out {
            Some(_) => seq.next_element_seed(Bounded {
                budget: &mut *self.budget,
            })?,
            None => seq.next_element::<IgnoredAny>()?.map(|_| None),
        } {
            match (item, out.as_mut()) {
                (Some(v), Some(o)) => o.push(v),
                _ => out = None,
            }
        }
        Ok(out.map(Value::Array))
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = self.take().then(serde_json::Map::new);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let keep = out.is_some() && key.len() <= Given::STR;
            if !keep {
                out = None;
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let v = map.next_value_seed(Bounded {
                budget: &mut *self.budget,
            })?;
            match (v, out.as_mut()) {
                (Some(v), Some(o)) => {
                    o.insert(key.into_owned(), v);
                }
                _ => out = None,
            }
        }
        Ok(out.map(Value::Object))
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Stop;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a string or a list of at most {MAX_STOPS} strings")
            }
            fn visit_str<E>(self, v: &str) -> Result<Stop, E> {
                Ok(Stop::One(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Stop, E> {
                Ok(Stop::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    if out.len() == MAX_STOPS {
                        return Err(A::Error::custom(format!(
                            "at most {MAX_STOPS} stop strings"
                        )));
                    }
                    out.push(s);
                }
                Ok(Stop::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PromptVisitor)
    }
}

/// Text, or a list of token ids, texts or token-id lists (all one kind).
struct PromptVisitor;

impl<'de> Visitor<'de> for PromptVisitor {
    type Value = Prompt;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string, or a list of token ids, strings or token-id lists")
    }
    fn visit_str<E>(self, v: &str) -> Result<Prompt, E> {
        Ok(Prompt::Text(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Prompt, E> {
        Ok(Prompt::Text(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        // A wrong item names the rule too (its own error says what it was).
        let mixed = |e: A::Error| {
            A::Error::custom(format!(
                "{e} (a prompt list holds one kind of item: ids, strings or id lists)"
            ))
        };
        let mut out = match seq.next_element::<PromptItem>()? {
            None => return Ok(Prompt::Tokens(Vec::new())),
            Some(PromptItem::Id(t)) => Prompt::Tokens(vec![t]),
            Some(PromptItem::Text(s)) => Prompt::Texts(vec![s]),
            Some(PromptItem::Ids(v)) => Prompt::TokenLists(vec![v]),
        };
        // The rest are read as the first one's kind.
        match &mut out {
            Prompt::Tokens(v) => {
                while let Some(t) = seq.next_element::<i64>().map_err(mixed)? {
                    v.push(t);
                }
            }
            Prompt::Texts(v) => {
                while let Some(s) = seq.next_element::<String>().map_err(mixed)? {
                    v.push(s);
                }
            }
            Prompt::TokenLists(v) => {
                while let Some(l) = seq.next_element::<Vec<i64>>().map_err(mixed)? {
                    v.push(l);
                }
            }
            Prompt::Text(_) => unreachable!("a list is never text"),
        }
        Ok(out)
    }
}

/// The first item of a prompt list.
enum PromptItem {
    Id(i64),
    Text(String),
    Ids(Vec<i64>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token id, a string or a list of token ids")
            }
            fn visit_i64<E>(self, v: i64) -> Result<PromptItem, E> {
                Ok(PromptItem::Id(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PromptItem, E> {
                i64::try_from(v)
                    .map(PromptItem::Id)
                    .map_err(|_| E::custom(format!("token id {v} is out of range")))
            }
            fn visit_str<E>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                let mut v = Vec::new();
                while let Some(t) = seq.next_element::<i64>()? {
                    v.push(t);
                }
                Ok(PromptItem::Ids(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<Part>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}
