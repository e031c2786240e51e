//! Decoding pgoutput (protocol version 1, text format) into change events.
//!
//! pgwire-replication handles the wire protocol and turns `Begin`/`Commit` into events of its
//! own; every other pgoutput message reaches [`Decoder::decode`] as the raw payload of an
//! XLogData frame.
//!
//! Row images are turned into JSON text right here, in one pass over the bytes, with no
//! intermediate tree: see [`write_value`] for the mapping from PostgreSQL types to JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use super::error::{Error, Result};

/// A published table as the stream last described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity.
    pub key: bool,
}

impl Relation {
    pub fn key_columns(&self) -> impl Iterator<Item = &str> {
        self.columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row as a snapshot read it from the table (README: Snapshots).
    Snapshot,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "INSERT",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Truncate => "TRUNCATE",
            Operation::Snapshot => "SNAPSHOT",
        }
    }

    /// The one-byte code `cdc_event_log.operation` holds.
    pub fn code(self) -> u8 {
        match self {
            Operation::Insert => b'I',
            Operation::Update => b'U',
            Operation::Delete => b'D',
            Operation::Truncate => b'T',
            Operation::Snapshot => b'S',
        }
    }
}

/// One row-level change, ready to be written. Positions within the transaction (`seq`) and
/// the transaction's own fields are added by the pipeline loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub operation: Operation,
    /// JSON object text, or `None` when PostgreSQL sent no old row.
    pub before: Option<String>,
    /// JSON object text, or `None` for DELETE and TRUNCATE.
    pub after: Option<String>,
}

/// What one pgoutput message amounted to.
#[derive(Debug)]
pub enum Decoded {
    /// A relation (re)description; the pipeline records it in the buffer.
    Relation(Arc<Relation>),
    /// One change.
    Change(Change),
    /// TRUNCATE: one change per table.
    Truncate(Vec<Change>),
    /// Nothing to record (type or origin messages).
    Nothing,
    /// A well-formed change that cannot be stored as an event.
    Poison(Poison),
}

/// A change the buffer cannot store: what it was and why.
#[derive(Debug)]
pub struct Poison {
    pub relation: Arc<Relation>,
    pub operation: Operation,
    /// Names the column and what is wrong with its value.
    pub reason: String,
}

#[derive(Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<Relation>>,
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated(&self) -> Error {
        Error::Decode(format!("{} message is truncated", self.what))
    }
    fn u8(&mut self) -> Result<u8> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.truncated())?;
        self.buf = rest;
        Ok(b)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn i16(&mut self) -> Result<i16> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(self.i32()? as u32)
    }
    fn cstr(&mut self) -> Result<String> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| {
                Error::Decode(format!(
                    "{} message has a name that is not UTF-8",
                    self.what
                ))
            })?
            .to_string();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decodes one pgoutput message (not Begin/Commit, which the stream reports itself). A
    /// well-formed change that cannot become an event is [`Decoded::Poison`].
    pub fn decode(&mut self, data: &[u8]) -> Result<Decoded> {
        match self.decode_message(data) {
            Err(Error::PoisonEvent(reason)) => {
                let (operation, id) = match data {
                    [b'I', id @ ..] => (Operation::Insert, id),
                    [b'U', id @ ..] => (Operation::Update, id),
                    [b'D', id @ ..] => (Operation::Delete, id),
                    _ => return Err(Error::Decode(reason)),
                };
                let mut r = Reader {
                    buf: id,
                    what: operation.as_str(),
                };
                Ok(Decoded::Poison(Poison {
                    relation: self.lookup(r.u32()?)?,
                    operation,
                    reason,
                }))
            }
            other => other,
        }
    }

    fn decode_message(&mut self, data: &[u8]) -> Result<Decoded> {
        let Some((&tag, body)) = data.split_first() else {
            return Err(Error::Decode("empty message".into()));
        };
        match tag {
            b'R' => self.relation(body),
            b'I' => {
                let mut r = Reader {
                    buf: body,
                    what: "INSERT",
                };
                let relation = self.lookup(r.u32()?)?;
                expect(&mut r, b'N')?;
                let after = tuple(&mut r, &relation, false)?;
                Ok(Decoded::Change(Change {
                    relation,
                    operation: Operation::Insert,
                    before: None,
                    after: Some(after),
                }))
            }
            b'U' => {
                let mut r = Reader {
                    buf: body,
                    what: "UPDATE",
                };
                let relation = self.lookup(r.u32()?)?;
                let mut before = None;
                let mut kind = r.u8()?;
                if kind == b'K' || kind == b'O' {
                    before = Some(tuple(&mut r, &relation, kind == b'K')?);
                    kind = r.u8()?;
                }
                if kind != b'N' {
                    return Err(Error::Decode(format!(
                        "UPDATE message has tuple kind {:?} where N was expected",
                        kind as char
                    )));
                }
                let after = tuple(&mut r, &relation, false)?;
                Ok(Decoded::Change(Change {
                    relation,
                    operation: Operation::Update,
                    before,
                    after: Some(after),
                }))
            }
            b'D' => {
                let mut r = Reader {
                    buf: body,
                    what: "DELETE",
                };
                let relation = self.lookup(r.u32()?)?;
                let kind = r.u8()?;
                if kind != b'K' && kind != b'O' {
                    return Err(Error::Decode(format!(
                        "DELETE message has tuple kind {:?} where K or O was expected",
                        kind as char
                    )));
                }
                let before = tuple(&mut r, &relation, kind == b'K')?;
                Ok(Decoded::Change(Change {
                    relation,
                    operation: Operation::Delete,
                    before: Some(before),
                    after: None,
                }))
            }
            b'T' => {
                let mut r = Reader {
                    buf: body,
                    what: "TRUNCATE",
                };
                let n = r.i32()?;
                let _options = r.u8()?;
                let mut changes = Vec::with_capacity(n.clamp(0, 1024) as usize);
                for _ in 0..n {
                    let relation = self.lookup(r.u32()?)?;
                    changes.push(Change {
                        relation,
                        operation: Operation::Truncate,
                        before: None,
                        after: None,
                    });
                }
                Ok(Decoded::Truncate(changes))
            }
            // Type ('Y') and origin ('O') messages describe, they carry no change.
            b'Y' | b'O' => Ok(Decoded::Nothing),
            other => Err(Error::Decode(format!(
                "unknown pgoutput message type {:?}",
                other as char
            ))),
        }
    }

    fn relation(&mut self, body: &[u8]) -> Result<Decoded> {
        let mut r = Reader {
            buf: body,
            what: "RELATION",
        };
        let id = r.u32()?;
        let mut schema = r.cstr()?;
        if schema.is_empty() {
            schema = "pg_catalog".into();
        }
        let name = r.cstr()?;
        let replica_identity = r.u8()? as char;
        let n = r.i16()?;
        let mut columns = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            let flags = r.u8()?;
            columns.push(Column {
                name: r.cstr()?,
                type_oid: r.u32()?,
                type_modifier: r.i32()?,
                key: flags & 1 == 1,
            });
        }
        let rel = Arc::new(Relation {
            id,
            schema,
            name,
            replica_identity,
            columns,
        });
        self.relations.insert(id, rel.clone());
        Ok(Decoded::Relation(rel))
    }

    /// The stream's latest description of relation `id`, if it described it yet.
    pub fn described(&self, id: u32) -> Option<Arc<Relation>> {
        self.relations.get(&id).cloned()
    }

    fn lookup(&self, id: u32) -> Result<Arc<Relation>> {
        self.relations.get(&id).cloned().ok_or_else(|| {
            Error::Decode(format!(
                "change for relation {id}, which the stream has not described"
            ))
        })
    }
}

fn expect(r: &mut Reader<'_>, want: u8) -> Result<()> {
    let got = r.u8()?;
    if got != want {
        return Err(Error::Decode(format!(
            "{} message has tuple kind {:?} where {:?} was expected",
            r.what, got as char, want as char
        )));
    }
    Ok(())
}

/// Reads TupleData and writes it as a JSON object keyed by column name. With `key_only`,
/// only replica-identity columns are kept (PostgreSQL sends the rest as nulls).
fn tuple(r: &mut Reader<'_>, rel: &Relation, key_only: bool) -> Result<String> {
    let n = r.i16()? as usize;
    if n != rel.columns.len() {
        return Err(Error::Decode(format!(
            "{} row for {}.{} has {n} columns, the relation has {}",
            r.what,
            rel.schema,
            rel.name,
            rel.columns.len()
        )));
    }
    let mut out = String::with_capacity(16 + r.buf.len() + 8 * n);
    out.push('{');
    let mut first = true;
    for col in &rel.columns {
        let kind = r.u8()?;
        let value = match kind {
            b'n' => None,
            // Unchanged TOASTed value: absent from the image, never null.
            b'u' => continue,
            b't' => {
                let len = r.i32()?;
                if len < 0 {
                    return Err(Error::Decode(format!(
                        "{} value has negative length",
                        r.what
                    )));
                }
                Some(r.bytes(len as usize)?)
            }
            b'b' => {
                return Err(Error::Decode(
                    "binary tuple data received; the stream must use text format".into(),
                ))
            }
            other => {
                return Err(Error::Decode(format!(
                    "{} tuple has unknown column kind {:?}",
                    r.what, other as char
                )))
            }
        };
        if key_only && !col.key {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        write_json_string(&mut out, &col.name);
        out.push(':');
        match value {
            None => out.push_str("null"),
            Some(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    Error::PoisonEvent(format!(
                        "column {} of {}.{} holds a value that is not valid UTF-8 (a SQL_ASCII source stores bytes unchecked)",
                        col.name, rel.schema, rel.name
                    ))
                })?;
                write_value(&mut out, col.type_oid, text);
            }
        }
    }
    out.push('}');
    Ok(out)
}

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// Writes one non-null value given PostgreSQL's text output for it:
/// integers, floats and numerics as JSON numbers with every digit kept (`NaN`, `Infinity`,
/// `-Infinity` as strings), booleans as `true`/`false`, json/jsonb embedded as they are,
/// everything else as its text output in a JSON string.
pub fn write_value(out: &mut String, type_oid: u32, text: &str) {
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 => out.push_str(text),
        oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC => {
            if text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
                && text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
                && !text.ends_with('y')
            {
                out.push_str(text)
            } else {
                write_json_string(out, text)
            }
        }
        oid::BOOL => out.push_str(if text == "t" { "true" } else { "false" }),
        oid::JSONB => out.push_str(text),
        // json keeps its text verbatim. A \u0000 escape would make the whole image fail a
        // consumer's cast to jsonb (and `->>`): such a document is kept as a string.
        oid::JSON if !text.contains("\\u0000") => out.push_str(text),
        _ => write_json_string(out, text),
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // Most bytes need no escape: one table lookup decides.
        if !NEEDS_ESCAPE[b as usize] {
            continue;
        }
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Bytes a JSON string must escape: `"`, `\` and the control characters.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_msg() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(16385u32.to_be_bytes());
        m.extend(b"public\0orders\0");
        m.push(b'd');
        m.extend(3i16.to_be_bytes());
        for (flags, name, oid) in [(1u8, "id", 20u32), (0, "note", 25), (0, "doc", 3802)] {
            m.push(flags);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(oid.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn text(m: &mut Vec<u8>, s: &str) {
        m.push(b't');
        m.extend((s.len() as i32).to_be_bytes());
        m.extend(s.as_bytes());
    }

    #[test]
    fn insert_update_delete_become_json() {
        let mut d = Decoder::new();
        assert!(matches!(
            d.decode(&relation_msg()).unwrap(),
            Decoded::Relation(_)
        ));

        let mut ins = vec![b'I'];
        ins.extend(16385u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(3i16.to_be_bytes());
        text(&mut ins, "12345678901234567");
        text(&mut ins, "say \"hi\"\n");
        text(&mut ins, "{\"a\": [1, 2.50]}");
        let Decoded::Change(c) = d.decode(&ins).unwrap() else {
            panic!()
        };
        assert_eq!(c.operation, Operation::Insert);
        let after: serde_json::Value = serde_json::from_str(c.after.as_deref().unwrap()).unwrap();
        assert_eq!(after["id"], serde_json::json!(12345678901234567u64));
        assert_eq!(after["note"], "say \"hi\"\n");
        assert_eq!(after["doc"]["a"][0], 1);

        // UPDATE with the old key and an unchanged TOAST column.
        let mut upd = vec![b'U'];
        upd.extend(16385u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(3i16.to_be_bytes());
        text(&mut upd, "7");
        upd.push(b'n');
        upd.push(b'n');
        upd.push(b'N');
        upd.extend(3i16.to_be_bytes());
        text(&mut upd, "8");
        upd.push(b'u');
        upd.push(b'n');
        let Decoded::Change(c) = d.decode(&upd).unwrap() else {
            panic!()
        };
        assert_eq!(c.before.as_deref(), Some(r#"{"id":7}"#));
        assert_eq!(c.after.as_deref(), Some(r#"{"id":8,"doc":null}"#));

        let mut del = vec![b'D'];
        del.extend(16385u32.to_be_bytes());
        del.push(b'K');
        del.extend(3i16.to_be_bytes());
        text(&mut del, "8");
        del.push(b'n');
        del.push(b'n');
        let Decoded::Change(c) = d.decode(&del).unwrap() else {
            panic!()
        };
        assert_eq!(c.operation, Operation::Delete);
        assert_eq!(c.before.as_deref(), Some(r#"{"id":8}"#));
        assert!(c.after.is_none());
    }

    #[test]
    fn truncated_and_unknown_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        let full = relation_msg();
        for cut in 0..full.len() {
            let _ = d.decode(&full[..cut]);
        }
        assert!(d.decode(b"Zxx").is_err());
        let mut ins = vec![b'I'];
        ins.extend(99u32.to_be_bytes());
        assert!(d
            .decode(&ins)
            .unwrap_err()
            .to_string()
            .contains("relation 99"));
    }

    #[test]
    fn numbers_keep_precision_and_specials_are_strings() {
        let cases = [
            (
                oid::NUMERIC,
                "12345678901234567890.000000000000000001",
                "12345678901234567890.000000000000000001",
            ),
            (oid::NUMERIC, "NaN", "\"NaN\""),
            (oid::FLOAT8, "-Infinity", "\"-Infinity\""),
            (oid::FLOAT8, "1e+300", "1e+300"),
            (oid::FLOAT4, "Infinity", "\"Infinity\""),
            (oid::BOOL, "t", "true"),
            (oid::BOOL, "f", "false"),
            (
                oid::JSON,
                "{\"a\":\"\\u0000\"}",
                "\"{\\\"a\\\":\\\"\\\\u0000\\\"}\"",
            ),
            (17, "\\x00ff", "\"\\\\x00ff\""),
            (25, "tab\there\u{1}", "\"tab\\there\\u0001\""),
        ];
        for (oid, input, want) in cases {
            let mut out = String::new();
            write_value(&mut out, oid, input);
            assert_eq!(out, want, "oid {oid} {input}");
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
    }
}
