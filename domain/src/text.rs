//! Text the read models can store.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold U+0000 (NUL): a row carrying one fails its
//! statement, and a projector that cannot apply an event retries it for ever, holding up every
//! event after it. So text that reaches a read model is refused at the edge when it holds one
//! (the embedded default could store it, but both adapters must decide alike).

use serde_json::{Map, Value};

/// `Err` with what to fix when `value` holds a NUL.
pub fn check(field: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        Err(refusal(field))
    } else {
        Ok(())
    }
}

/// `value` quoted for an error message, cut after 64 characters: a refusal that echoed a
/// multi-megabyte value whole made a status message clients cannot read.
pub fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// `value` with each NUL replaced by U+FFFD, for text recorded from elsewhere that cannot be
/// refused (a remote server's error answer kept in a notification's outcome).
pub fn storable(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

/// Like [`check`] for every key and string inside a JSON value; names the first offender's
/// path (`data.model`, `data.tags[2]`).
pub fn check_json(field: &str, value: &Value) -> Result<(), String> {
    value_nul(value).map_or(Ok(()), |rest| Err(refusal(&format!("{field}{rest}"))))
}

/// [`check_json`] for an object's keys and values.
pub fn check_object(field: &str, map: &Map<String, Value>) -> Result<(), String> {
    object_nul(map).map_or(Ok(()), |rest| Err(refusal(&format!("{field}{rest}"))))
}

fn refusal(field: &str) -> String {
    format!("`{field}` contains U+0000 (NUL), which cannot be stored; remove it")
}

// The path below the value to the first NUL, built only once one is found: every usage event
// goes through here, on the live path and in a rebuild.
fn value_nul(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| value_nul(v).map(|rest| format!("[{i}]{rest}"))),
        Value::Object(map) => object_nul(map),
        _ => None,
    }
}

fn object_nul(map: &Map<String, Value>) -> Option<String> {
    map.iter().find_map(|(k, v)| {
        let rest = if k.contains('\0') {
            String::new()
        } else {
            value_nul(v)?
        };
        Some(format!(".{}{rest}", k.escape_debug()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nul_in_keys_strings_and_arrays_and_names_where() {
        assert!(check("context", "fine\n\ttext").is_ok());
        assert!(check("context", "a\0b").unwrap_err().contains("`context`"));
        let ok = serde_json::json!({"model": "m", "n": [1, "x", {"k": null}]});
        assert!(check_json("data", &ok).is_ok());
        let e = check_json("data", &serde_json::json!({"tags": ["a", "b\u{0}"]})).unwrap_err();
        assert!(e.contains("`data.tags[1]`"), "{e}");
        let e = check_json("data", &serde_json::json!({"a\u{0}k": 1})).unwrap_err();
        assert!(e.contains("`data.a\\0k`"), "{e}");
        assert_eq!(storable("busy\0!"), "busy\u{FFFD}!");
    }

    #[test]
    fn long_values_are_shown_cut() {
        assert_eq!(shown("sb-1"), "\"sb-1\"");
        let huge = "é".repeat(1_000_000);
        let s = shown(&huge);
        assert!(s.len() < 200 && s.ends_with("… (2000000 bytes)"), "{s}");
    }
}
