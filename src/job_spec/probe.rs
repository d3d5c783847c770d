//! Locating a key after the fact: walk the document to it and fail there, so serde_norway marks the spot.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// The message of the walk's deliberate failure, told apart from real errors (a path that is not there).
pub(super) const PROBE: &str = "\u{1}omega-job-spec-probe";

#[derive(Clone, Copy, Debug)]
pub(super) enum Seg<'k> {
    Key(&'k str),
    Index(usize),
}

pub(super) struct Probe<'p, 'k> {
    pub(super) path: &'p [Seg<'k>],
    pub(super) skip: usize,
}

impl<'de> DeserializeSeed<'de> for Probe<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            // Any value, failed at its own position (the visitor accepts nothing).
            None => d.deserialize_any(Found),
            Some((Seg::Key(key), rest)) => d.deserialize_map(MapProbe { key, rest, skip: self.skip }),
            Some((Seg::Index(index), rest)) => d.deserialize_seq(SeqProbe { index: *index, rest, skip: self.skip }),
        }
    }
}

struct Found;

impl Visitor<'_> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROBE)
    }
}

struct MapProbe<'p, 'k> {
    key: &'k str,
    rest: &'p [Seg<'k>],
    skip: usize,
}

impl<'de> Visitor<'de> for MapProbe<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let last = self.rest.is_empty();
        let mut seen = 0;
        while let Some(hit) = map.next_key_seed(KeyProbe { key: self.key, fail: last && seen == self.skip })? {
            if hit && !last {
                map.next_value_seed(Probe { path: self.rest, skip: self.skip })?;
            } else {
                seen += usize::from(hit);
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A mapping key: whether it is the one sought, failing on it (at the key's position) when `fail`.
struct KeyProbe<'k> {
    key: &'k str,
    fail: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyProbe<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match (v == self.key, self.fail) {
            (true, true) => Err(E::custom(PROBE)),
            (hit, _) => Ok(hit),
        }
    }
}

struct SeqProbe<'p, 'k> {
    index: usize,
    rest: &'p [Seg<'k>],
    skip: usize,
}

impl<'de> Visitor<'de> for SeqProbe<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let more = if i == self.index {
                seq.next_element_seed(Probe { path: self.rest, skip: self.skip })?.is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
}
