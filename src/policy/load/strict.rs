//! The loader's fast path: YAML text straight into the typed [`k8s`](super::k8s) structs,
//! without building a `serde_norway::Value` first. Most of a directory load was building
//! and then converting that tree (`benches/check_test.rs`, the realistic 10k set).
//!
//! Contract: [`Strict`] accepts a document only if going through a `Value` (the slow path,
//! which makes every message and field path the loader reports) would accept it and give
//! the same typed result; anything else is an error, and the caller then loads the file
//! on the slow path, so the messages stay exactly those of the slow path. It wraps
//! `serde_norway`'s streaming deserializer and narrows it to what `Value`'s deserializer
//! does: a string field takes only a YAML string (the streaming deserializer would also
//! take `80` or `true` as text), a number only a number, a struct or map only a mapping, a
//! list only a sequence, no mapping key twice (a `Value` mapping refuses duplicates; a
//! streaming `BTreeMap` would keep the last). It refuses outright what it need not
//! support: skipped subtrees (`status`, `managedFields`: their duplicate keys would go
//! unseen), enums and tags, `null` as an empty map or list. Callers also keep texts with
//! tags, anchors, aliases or merge keys off this path ([`plain_text`]).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Whether `text` can go through [`Strict`] at all: no tag (`!`), anchor (`&`), alias (`*`)
/// or merge key (`<<`), whose `Value` and streaming readings are not worth proving equal.
/// Conservative: those characters inside a string also send the file the slow way.
pub fn plain_text(text: &str) -> bool {
    let b = text.as_bytes();
    memchr::memchr3(b'!', b'&', b'*', b).is_none() && memchr::memmem::find(b, b"<<").is_none()
}

/// A deserializer narrowed as the module doc says.
pub struct Strict<D>(pub D);

/// What a node may be, as the caller asked for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// `deserialize_any`: whatever the document holds (scalars, mappings, sequences).
    Any,
    Str,
    Num,
    Map,
    Seq,
}

/// The error of the fast path; never shown (the slow path reports instead).
fn refuse<E: de::Error>() -> E {
    E::custom("not on the fast path")
}

struct Narrow<'k, V> {
    inner: V,
    want: Want,
    /// For a map key: the keys seen so far in its mapping (a key must be new).
    keys: Option<&'k mut Seen>,
}

impl<'k, V> Narrow<'k, V> {
    fn new(inner: V, want: Want) -> Self {
        Narrow { inner, want, keys: None }
    }
    fn allows(&self, w: Want) -> bool {
        self.want == Want::Any || self.want == w
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Narrow<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V::Value, E> {
        if !self.allows(Want::Num) || self.keys.is_some() {
            return Err(refuse());
        }
        self.inner.visit_i64(v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V::Value, E> {
        if !self.allows(Want::Num) || self.keys.is_some() {
            return Err(refuse());
        }
        self.inner.visit_u64(v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<V::Value, E> {
        if !self.allows(Want::Num) || self.keys.is_some() {
            return Err(refuse());
        }
        self.inner.visit_f64(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        if !self.allows(Want::Str) {
            return Err(refuse());
        }
        if let Some(keys) = self.keys
            && !keys.insert(v)
        {
            return Err(refuse());
        }
        self.inner.visit_str(v)
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        if !self.allows(Want::Str) {
            return Err(refuse());
        }
        if let Some(keys) = self.keys
            && !keys.insert(v)
        {
            return Err(refuse());
        }
        self.inner.visit_borrowed_str(v)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        if !self.allows(Want::Str) {
            return Err(refuse());
        }
        if let Some(keys) = self.keys
            && !keys.insert(&v)
        {
            return Err(refuse());
        }
        self.inner.visit_string(v)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        if !self.allows(Want::Map) || self.keys.is_some() {
            return Err(refuse());
        }
        self.inner.visit_map(StrictMap { inner: map, keys: Seen::default() })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if !self.allows(Want::Seq) || self.keys.is_some() {
            return Err(refuse());
        }
        self.inner.visit_seq(StrictSeq(seq))
    }
    // Everything else (bool, null, enums/tags, bytes) is off the fast path: the types
    // the loader reads have no bool, and a null where a value is wanted is an error or
    // an empty collection that the slow path handles.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<V::Value, E> {
        Err(refuse())
    }
    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        Err(refuse())
    }
    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        Err(refuse())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<V::Value, A::Error> {
        Err(refuse())
    }
}

/// `Option<T>`: absent or `null` is `None` exactly as a `Value` `Null` is.
struct OptionVisitor<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for OptionVisitor<V> {
    type Value = V::Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Strict(d))
    }
}

/// The keys of one mapping so far, as 64-bit FNV-1a hashes (no allocation per key). Two
/// different keys with one hash only send the file to the slow path, which is always
/// right.
#[derive(Default)]
struct Seen(Vec<u64>);

impl Seen {
    /// `false` when `key` (or its hash) was seen before.
    fn insert(&mut self, key: &str) -> bool {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        if self.0.contains(&h) {
            return false;
        }
        self.0.push(h);
        true
    }
}

struct StrictMap<A> {
    inner: A,
    keys: Seen,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(KeySeed { seed, keys: &mut self.keys })
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.inner.next_value_seed(StrictSeed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct StrictSeq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for StrictSeq<A> {
    type Error = A::Error;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        self.0.next_element_seed(StrictSeed(seed))
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct StrictSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for StrictSeed<S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Strict(d))
    }
}

/// A map key: a string (struct field names and `BTreeMap<String, _>` keys alike), new
/// in its mapping.
struct KeySeed<'k, S> {
    seed: S,
    keys: &'k mut Seen,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<'_, S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Key { inner: d, keys: self.keys })
    }
}

struct Key<'k, D> {
    inner: D,
    keys: &'k mut Seen,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Key<'_, D> {
    type Error = D::Error;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        let narrow = Narrow { inner: v, want: Want::Str, keys: Some(self.keys) };
        self.inner.deserialize_any(narrow)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, D: Deserializer<'de>> Strict<D> {
    fn narrow<V: Visitor<'de>>(self, v: V, want: Want) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Narrow::new(v, want))
    }
}

macro_rules! refused {
    ($($method:ident($($arg:ty),*)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, $(_: $arg,)* _: V) -> Result<V::Value, D::Error> {
            Err(refuse())
        })*
    };
}

macro_rules! narrowed {
    ($want:expr => $($method:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.narrow(v, $want)
        })*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.narrow(v, Want::Any)
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_option(OptionVisitor(v))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.narrow(v, Want::Map)
    }
    narrowed!(Want::Str => deserialize_str, deserialize_string, deserialize_identifier);
    narrowed!(Want::Num => deserialize_i8, deserialize_i16, deserialize_i32, deserialize_i64,
        deserialize_u8, deserialize_u16, deserialize_u32, deserialize_u64);
    narrowed!(Want::Map => deserialize_map);
    narrowed!(Want::Seq => deserialize_seq);
    refused!(
        deserialize_bool(),
        deserialize_f32(),
        deserialize_f64(),
        deserialize_char(),
        deserialize_bytes(),
        deserialize_byte_buf(),
        deserialize_unit(),
        deserialize_unit_struct(&'static str),
        deserialize_newtype_struct(&'static str),
        deserialize_tuple(usize),
        deserialize_tuple_struct(&'static str, usize),
        deserialize_ignored_any(),
    );
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, D::Error> {
        Err(refuse())
    }
}

/// Every document of `text` as `T` through [`Strict`] (an empty document is `None`);
/// `None` when any document is off the fast path.
pub fn documents<T: de::DeserializeOwned>(text: &str) -> Option<Vec<Option<T>>> {
    if !plain_text(text) {
        return None;
    }
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        out.push(de::Deserialize::deserialize(Strict(doc)).ok()?);
    }
    Some(out)
}

/// The single document of `text` as `T` through [`Strict`] (empty: `None`); `None` in
/// the outer option when it is off the fast path.
pub fn document<T: de::DeserializeOwned>(text: &str) -> Option<Option<T>> {
    if !plain_text(text) {
        return None;
    }
    let de = serde_norway::Deserializer::from_str(text);
    <Option<T> as de::Deserialize>::deserialize(Strict(de)).ok()
}
