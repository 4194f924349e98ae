//! The little SQL the store's logic speaks, the same for SQLite and PostgreSQL: statements with
//! `?1`, `?2`… placeholders, arguments of four kinds, and rows of cells read back by position.
//!
//! Invariants: the store's logic is written once against [`Tx`]; a backend only runs statements
//! inside the transaction it opened, so the logic cannot tell the databases apart. Statements
//! use the subset both databases read the same way (no `INSERT OR REPLACE`, no scalar `MAX`, no
//! boolean sums); integers are 64-bit in both.

use super::StoreError;

/// An argument of a statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// Text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Arg<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Arg::Blob(v)
    }
}

impl<'a> From<&'a [u8; 32]> for Arg<'a> {
    fn from(v: &'a [u8; 32]) -> Self {
        Arg::Blob(v)
    }
}

impl<'a, T: Into<Arg<'a>>> From<Option<T>> for Arg<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Arg::Null, Into::into)
    }
}

/// The arguments of a statement, each converted by `Arg::from`.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::store::sql::Arg::from($a)),*] };
}
pub(crate) use args;

/// One value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row read back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

fn wrong(i: usize, wanted: &str, got: &Cell) -> StoreError {
    StoreError::Unavailable(format!("column {i}: expected {wanted}, found {got:?}"))
}

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, StoreError> {
        self.0.get(i).ok_or_else(|| StoreError::Unavailable(format!("no column {i}")))
    }

    /// Text (NOT NULL).
    pub(crate) fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.cell(i)? {
            Cell::Text(s) => Ok(s.clone()),
            other => Err(wrong(i, "text", other)),
        }
    }

    /// Text or NULL.
    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    /// An integer (NOT NULL); a boolean reads as 0 or 1.
    pub(crate) fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.cell(i)? {
            Cell::Int(v) => Ok(*v),
            other => Err(wrong(i, "an integer", other)),
        }
    }

    /// An integer or NULL.
    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    /// Bytes (NOT NULL).
    pub(crate) fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.cell(i)? {
            Cell::Blob(b) => Ok(b.clone()),
            other => Err(wrong(i, "bytes", other)),
        }
    }

    /// Bytes or NULL.
    pub(crate) fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            _ => self.blob(i).map(Some),
        }
    }
}

/// A transaction a backend opened: statements run inside it, and it commits when the logic
/// returns `Ok` (rolls back on `Err`).
pub(crate) trait Tx {
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError>;
    /// Runs a query; its rows.
    fn rows(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError>;
}

impl dyn Tx + '_ {
    /// The first row of a query, if any.
    pub(crate) fn row(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }

    /// The first column of the first row, as an integer (a count, an `EXISTS`).
    pub(crate) fn int(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<i64, StoreError> {
        self.row(sql, args)?.ok_or_else(|| StoreError::Unavailable("no row".into()))?.int(0)
    }
}

/// A statement in PostgreSQL's spelling: `?N` placeholders become `$N` (the store's statements
/// hold no `?` of their own in literals).
pub(crate) fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_respelt_for_postgres() {
        assert_eq!(
            dollar_placeholders("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2)"),
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2)"
        );
        assert_eq!(dollar_placeholders("?10, ?"), "$10, ?");
    }
}
