//! Environment substitution in config string values, and the `.env` file beside the config.
//!
//! Supported forms: `${VAR}`, `${VAR:-default}`, `${env:VAR}` and VS Code's `${workspaceFolder}`,
//! `${workspaceFolderBasename}`, `${userHome}`, `${pathSeparator}` (`${/}`), `$$` for a literal `$`,
//! and MCP Front's `$env:VAR|default` / `$env:VAR` as a whole value. `${input:…}` is refused:
//! Portcullis runs unattended and cannot prompt. A `$` not starting one of these forms is literal.
//! Invariant: substitution is applied to typed string fields after parsing, never to the raw
//! file, so a variable's value cannot inject structure.

use std::collections::HashMap;
use std::path::Path;

/// Where variable values come from: the process environment over the `.env` file.
#[derive(Debug, Clone, Default)]
pub struct Env {
    dotenv: HashMap<String, String>,
    process: HashMap<String, String>,
    /// What was wrong with the `.env` file (lines skipped), for the config's warnings.
    pub(crate) warnings: Vec<String>,
    /// VS Code's `${workspaceFolder}`: the folder holding `.vscode/`, or the config's folder.
    workspace: Option<std::path::PathBuf>,
    /// An unset variable reads as a placeholder instead of an error (see [`Env::lenient`]).
    lenient: bool,
}

/// What an unset variable reads as in a lenient environment: never a value anyone could
/// present or a path that could exist (it holds a NUL).
fn unset_placeholder(name: &str) -> String {
    format!("\u{0}unset:{name}")
}

/// Whether a substituted value holds a variable that was unset (in a lenient environment).
pub(crate) fn has_unset(value: &str) -> bool {
    value.contains("\u{0}unset:")
}

/// Why a value could not be substituted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SubstError {
    /// A referenced variable is unset and has no default.
    #[error("environment variable {0} is not set (and has no default)")]
    Missing(String),
    /// `${input:…}`: VS Code prompts for these; a gateway cannot.
    #[error(
        "`${{input:{0}}}` asks for interactive input, which Portcullis cannot prompt for; use ${{env:VAR}} instead"
    )]
    Input(String),
    /// `${` without a closing brace, or an empty name.
    #[error("malformed variable reference: {0}")]
    Malformed(String),
}

impl Env {
    /// The process environment plus the `.env` file in `dir`, if present.
    pub(crate) fn load(dir: Option<&Path>) -> Self {
        let (dotenv, warnings) = dir
            .map(|d| d.join(".env"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| parse_dotenv(&s))
            .unwrap_or_default();
        let warnings = warnings.into_iter().map(|w| format!(".env: {w}")).collect();
        Env { dotenv, process: std::env::vars().collect(), warnings, workspace: None, lenient: false }
    }

    /// The same environment, where an unset variable is not an error but a placeholder that
    /// can match nothing: for the commands that read a config only for its store, servers and
    /// tenants (`portcullis token …`), so an unrelated upstream secret need not be set.
    pub(crate) fn lenient(mut self) -> Self {
        self.lenient = true;
        self
    }

    /// The same environment, with VS Code's workspace folder for the config file at `file`:
    /// the folder holding `.vscode/` when the file is in one, else the file's own folder.
    pub(crate) fn for_file(mut self, file: &Path) -> Self {
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let workspace = if dir.file_name().is_some_and(|n| n == ".vscode") {
            dir.parent().map_or(dir.clone(), Path::to_path_buf)
        } else {
            dir
        };
        self.workspace = Some(workspace);
        self
    }

    /// An environment with exactly these variables (tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Env {
            dotenv: HashMap::new(),
            warnings: Vec::new(),
            workspace: None,
            lenient: false,
            process: pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
        }
    }

    /// A variable's value; the process environment wins over `.env`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.process.get(name).or_else(|| self.dotenv.get(name)).map(String::as_str)
    }

    /// Substitutes every reference in `input`, collecting every problem rather than the first.
    pub(crate) fn substitute(&self, input: &str) -> Result<String, Vec<SubstError>> {
        if !input.contains('$') {
            return Ok(input.to_owned());
        }
        if let Some(rest) = input.strip_prefix("$env:") {
            let (name, default) = match rest.split_once('|') {
                Some((n, d)) => (n, Some(d)),
                None => (rest, None),
            };
            if is_name(name) {
                return match (self.get(name), default) {
                    (Some(v), _) => Ok(v.to_owned()),
                    (None, Some(d)) => Ok(d.to_owned()),
                    (None, None) if self.lenient => Ok(unset_placeholder(name)),
                    (None, None) => Err(vec![SubstError::Missing(name.to_owned())]),
                };
            }
        }
        let mut out = String::with_capacity(input.len());
        let mut errors = Vec::new();
        let mut rest = input;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    errors.push(SubstError::Malformed(rest.to_owned()));
                    break;
                };
                let reference = &body[..end];
                rest = &body[end + 1..];
                match self.reference(reference) {
                    Ok(v) => out.push_str(&v),
                    Err(e) => errors.push(e),
                }
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        if errors.is_empty() { Ok(out) } else { Err(errors) }
    }

    fn reference(&self, reference: &str) -> Result<String, SubstError> {
        if let Some(input) = reference.strip_prefix("input:") {
            return Err(SubstError::Input(input.to_owned()));
        }
        if let Some(v) = self.vscode(reference) {
            return Ok(v);
        }
        let reference = reference.strip_prefix("env:").unwrap_or(reference);
        let (name, default) = match reference.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        if !is_name(name) {
            return Err(SubstError::Malformed(format!("${{{reference}}}")));
        }
        match (self.get(name), default) {
            (Some(v), _) if !(v.is_empty() && default.is_some()) => Ok(v.to_owned()),
            (_, Some(d)) => Ok(d.to_owned()),
            (Some(v), None) => Ok(v.to_owned()),
            (None, None) if self.lenient => Ok(unset_placeholder(name)),
            (None, None) => Err(SubstError::Missing(name.to_owned())),
        }
    }
}

impl Env {
    /// The workspace folder of a VS Code file (the config's folder for any other file), when
    /// the environment was made for a file.
    pub(crate) fn workspace(&self) -> Option<&Path> {
        self.workspace.as_deref()
    }

    /// VS Code's predefined variables: `${workspaceFolder}`, `${workspaceFolderBasename}`,
    /// `${userHome}`, `${pathSeparator}` (and its short form `${/}`).
    fn vscode(&self, reference: &str) -> Option<String> {
        let workspace = || self.workspace.clone().or_else(|| std::env::current_dir().ok());
        match reference {
            "workspaceFolder" => workspace().map(|w| w.display().to_string()),
            "workspaceFolderBasename" => workspace()?.file_name().map(|n| n.to_string_lossy().into_owned()),
            "userHome" => self.get("HOME").map(str::to_owned),
            "pathSeparator" | "/" => Some(std::path::MAIN_SEPARATOR.to_string()),
            _ => None,
        }
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads a dotenv file's `KEY=VALUE` lines with `dotenvy` (quotes, `#` comments, escapes,
/// `export`, `${VAR}` references to earlier lines), without touching the process environment.
/// A line it cannot read is skipped and counted in the returned warnings (its text is not shown:
/// it may hold a secret).
pub(crate) fn parse_dotenv(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut out = HashMap::new();
    let mut skipped = 0;
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        match item {
            Ok((key, value)) => {
                out.insert(key, value);
            }
            Err(dotenvy::Error::LineParse(..)) => skipped += 1,
            Err(_) => skipped += 1,
        }
    }
    let warnings = match skipped {
        0 => Vec::new(),
        n => vec![format!(
            "{n} line{} that {} not KEY=VALUE skipped",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" }
        )],
    };
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env::from_pairs([("A", "alpha"), ("EMPTY", "")])
    }

    #[test]
    fn forms() {
        let e = env();
        assert_eq!(e.substitute("x-${A}-y").unwrap(), "x-alpha-y");
        assert_eq!(e.substitute("${env:A}").unwrap(), "alpha");
        assert_eq!(e.substitute("${B:-dflt}").unwrap(), "dflt");
        assert_eq!(e.substitute("${EMPTY:-dflt}").unwrap(), "dflt");
        assert_eq!(e.substitute("$$HOME and $5").unwrap(), "$HOME and $5");
        assert_eq!(e.substitute("$env:A|zzz").unwrap(), "alpha");
        assert_eq!(e.substitute("$env:B|zzz").unwrap(), "zzz");
        assert_eq!(e.substitute("plain").unwrap(), "plain");
    }

    #[test]
    fn all_errors_at_once() {
        let errs = env().substitute("${B}${C}${input:tok}").unwrap_err();
        assert_eq!(
            errs,
            vec![SubstError::Missing("B".into()), SubstError::Missing("C".into()), SubstError::Input("tok".into())]
        );
        assert!(env().substitute("${A").is_err());
        assert!(env().substitute("$env:B").is_err());
    }

    #[test]
    fn dotenv() {
        let (m, warnings) = parse_dotenv(
            "# c\nexport X=1\nY=\"two words\"\nZ=3 # trailing\nALICE_TOKEN=\"alice-secret\" # comment\nQ='it''s'\nE=\"a\\\"b\"\n",
        );
        assert_eq!(m["X"], "1");
        assert_eq!(m["Y"], "two words");
        assert_eq!(m["Z"], "3");
        assert_eq!(m["ALICE_TOKEN"], "alice-secret");
        assert_eq!(m["E"], "a\"b");
        assert!(warnings.is_empty(), "{warnings:?}");
        let (m, warnings) = parse_dotenv("A=1\nnot a line\nB=2\n");
        assert_eq!(m.get("A").map(String::as_str), Some("1"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("1 line"), "{warnings:?}");
    }
}
