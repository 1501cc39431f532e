//! JSON Lines files: one JSON object per line; the document is one of its string fields.

use std::fmt;
use std::ops::ControlFlow;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Location, Problem, Raw, Stream};
use crate::error::Result;

/// Reads the lines of a JSON Lines stream as raw records (blank lines are skipped); parsing is
/// [`text_field`]'s, later. A stream that stops decompressing ends the file with a bad record at
/// the line being read.
pub(super) fn read(
    stream: Stream,
    emit: &mut dyn FnMut(Location, Raw) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let stopped = stream.for_each_line(emit, |number, line| {
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        Some((Location::Line(number), Raw::JsonLine(std::mem::take(line))))
    })?;
    Ok(stopped.unwrap_or(ControlFlow::Continue(())))
}

/// The string in field `field` of the JSON object on `line`. Other fields are skipped without
/// being built; if the field appears twice, the first one counts.
pub(super) fn text_field(line: &str, field: &str) -> std::result::Result<String, Problem> {
    let mut deserializer = serde_json::Deserializer::from_str(line);
    let found = FieldOf { field }
        .deserialize(&mut deserializer)
        .and_then(|found| deserializer.end().map(|()| found))
        .map_err(|e| Problem::InvalidJson(json_error(&e)))?;
    match found {
        Found::Text(text) => Ok(text),
        Found::Other(kind) => Err(Problem::NotAString {
            field: field.to_string(),
            kind,
        }),
        Found::Missing => Err(Problem::MissingField(field.to_string())),
        Found::NotAnObject(kind) => Err(Problem::NotAnObject(kind)),
    }
}

/// serde_json's message with the column, without its "line 1" (the caller knows the line).
fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = match message.rsplit_once(" at line ") {
        Some((what, _)) => what.to_string(),
        None => message,
    };
    format!("{message} at column {}", e.column())
}

/// What the line held where the text should be.
enum Found {
    Text(String),
    /// The field holds this kind of value ("a number", "null", ...).
    Other(&'static str),
    Missing,
    /// The line is this kind of value instead of an object.
    NotAnObject(&'static str),
}

/// A seed that deserializes itself as its own visitor of `$value`, through `$method`.
macro_rules! seed_visits_itself {
    ($seed:ty, $value:ty, $method:ident) => {
        impl<'de> DeserializeSeed<'de> for $seed {
            type Value = $value;

            fn deserialize<D: de::Deserializer<'de>>(
                self,
                d: D,
            ) -> std::result::Result<$value, D::Error> {
                d.$method(self)
            }
        }
    };
}

/// The visit methods of JSON's booleans, numbers and null, each giving `$found(kind)` with the
/// kind of value in words ("a number", ...).
macro_rules! visit_scalars {
    ($found:path) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Found, E> {
            Ok($found("a boolean"))
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Found, E> {
            Ok($found("a number"))
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Found, E> {
            Ok($found("a number"))
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Found, E> {
            Ok($found("a number"))
        }

        fn visit_unit<E: de::Error>(self) -> std::result::Result<Found, E> {
            Ok($found("null"))
        }
    };
}

/// Visits the top-level object, keeping only field `field`.
struct FieldOf<'f> {
    field: &'f str,
}

seed_visits_itself!(FieldOf<'_>, Found, deserialize_any);

impl<'de> Visitor<'de> for FieldOf<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Found, A::Error> {
        let mut found = Found::Missing;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.field))? {
            if is_field && matches!(found, Found::Missing) {
                found = map.next_value_seed(TextValue)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Found, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Found::NotAnObject("an array"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Found, E> {
        Ok(Found::NotAnObject("a string"))
    }

    visit_scalars!(Found::NotAnObject);
}

/// Whether a key is the text field's name, compared without building the key.
struct KeyIs<'f>(&'f str);

seed_visits_itself!(KeyIs<'_>, bool, deserialize_str);

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> std::result::Result<bool, E> {
        Ok(key == self.0)
    }
}

/// The text field's value: the string, or what kind of value it is instead.
struct TextValue;

seed_visits_itself!(TextValue, Found, deserialize_any);

impl<'de> Visitor<'de> for TextValue {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> std::result::Result<Found, E> {
        Ok(Found::Text(text.to_string()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> std::result::Result<Found, E> {
        Ok(Found::Text(text))
    }

    visit_scalars!(Found::Other);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Found, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Found::Other("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Found, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Found::Other("an object"))
    }
}
