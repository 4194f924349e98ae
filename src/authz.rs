//! Authorization: what an identity may reach. Grants are a set of servers plus allow and `!deny`
//! globs over aggregated names (`files__read_*`), for tools, prompts and resources.
//!
//! Invariants: deny wins over allow whatever the order; a kind with no allow pattern allows
//! everything not denied; the same names are matched on `/mcp` and on `/servers/{name}/mcp`
//! (where `name` + separator is put in front), so one grant means the same on every endpoint.

use std::collections::BTreeSet;

/// A glob: `*` matches any run of characters (also empty), `?` exactly one; everything else
/// is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Its pattern text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// A glob from its pattern text.
    pub(crate) fn new(pattern: &str) -> Self {
        Glob(pattern.to_owned())
    }

    /// Whether `name` matches the whole pattern. Linear time (greedy with one backtrack point).
    pub(crate) fn matches(&self, name: &str) -> bool {
        if self.0.is_ascii() && name.is_ascii() {
            return glob_match(self.0.as_bytes(), name.as_bytes());
        }
        let p: Vec<char> = self.0.chars().collect();
        let s: Vec<char> = name.chars().collect();
        glob_match(&p, &s)
    }
}

/// The matcher over any symbol type (bytes for ASCII, chars otherwise), without allocating.
fn glob_match<T: Copy + PartialEq + From<u8>>(p: &[T], s: &[T]) -> bool {
    let star = T::from(b'*');
    let any = T::from(b'?');
    {
        let (mut pi, mut si) = (0, 0);
        let mut back: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == any || (p[pi] != star && p[pi] == s[si])) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == star {
                back = Some((pi, si));
                pi += 1;
            } else if let Some((sp, ss)) = back {
                pi = sp + 1;
                si = ss + 1;
                back = Some((sp, ss + 1));
            } else {
                return false;
            }
        }
        while pi < p.len() && p[pi] == star {
            pi += 1;
        }
        pi == p.len()
    }
}

/// Whether every name glob `p` matches is matched by glob `g` too (`g` covers `p`): `g`'s `*`
/// takes any run of `p`'s symbols, its `?` one symbol of `p` that is not `*`, its literals the
/// same literal. Sound for `*`/`?` globs: a `p` it accepts can match nothing `g` does not.
fn glob_covers(g: &[char], p: &[char]) -> bool {
    let (mut gi, mut pi) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    let one = |gc: char, pc: char| (gc == '?' && pc != '*') || (gc != '*' && gc != '?' && gc == pc);
    while pi < p.len() {
        if gi < g.len() && one(g[gi], p[pi]) {
            gi += 1;
            pi += 1;
        } else if gi < g.len() && g[gi] == '*' {
            back = Some((gi, pi));
            gi += 1;
        } else if let Some((bg, bp)) = back {
            gi = bg + 1;
            pi = bp + 1;
            back = Some((bg, bp + 1));
        } else {
            return false;
        }
    }
    while gi < g.len() && g[gi] == '*' {
        gi += 1;
    }
    gi == g.len()
}

/// Allow and deny globs for one kind of item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    /// Names that may be used (none: all).
    pub allow: Vec<Glob>,
    /// Names that may not, whatever `allow` says.
    pub deny: Vec<Glob>,
}

impl Patterns {
    /// Builds from config entries: `!glob` denies, anything else allows.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Patterns::default();
        for e in entries {
            match e.strip_prefix('!') {
                Some(d) => out.deny.push(Glob::new(d)),
                None => out.allow.push(Glob::new(e)),
            }
        }
        out
    }

    /// Whether a name is allowed.
    pub(crate) fn allows(&self, name: &str) -> bool {
        if self.deny.iter().any(|g| g.matches(name)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|g| g.matches(name))
    }

    /// True when nothing is restricted (lists can pass through unfiltered).
    pub(crate) fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether everything `other` allows, these allow too (a conservative check: `other` must
    /// carry each of these denies, and each of its allows must be covered by one of these).
    pub(crate) fn covers(&self, other: &Patterns) -> bool {
        if self.is_open() {
            return true;
        }
        let chars = |g: &Glob| g.0.chars().collect::<Vec<char>>();
        let denies_kept = self.deny.iter().all(|d| other.deny.contains(d));
        let allows_covered = self.allow.is_empty()
            || (!other.allow.is_empty()
                && other.allow.iter().all(|p| self.allow.iter().any(|g| glob_covers(&chars(g), &chars(p)))));
        denies_kept && allows_covered
    }
}

/// The kinds of named items grants cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// Tools (`tools/list`, `tools/call`).
    Tool,
    /// Prompts (`prompts/list`, `prompts/get`, prompt completions).
    Prompt,
    /// Resources and templates, by URI (`resources/*`, resource completions).
    Resource,
}

/// What one identity may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The servers it may reach (None: every server).
    pub servers: Option<BTreeSet<String>>,
    /// Tools, by aggregated name.
    pub tools: Patterns,
    /// Prompts, by aggregated name.
    pub prompts: Patterns,
    /// Resources, by `server` + separator + URI.
    pub resources: Patterns,
}

impl Grants {
    /// Everything (the admin tokens from the environment, or no authentication at all).
    pub fn all() -> Self {
        Grants::default()
    }

    /// Grants from the lists a config token or an issued token carries: `servers` (empty: all)
    /// and allow/`!`deny globs per kind.
    pub(crate) fn from_lists(servers: &[String], tools: &[String], prompts: &[String], resources: &[String]) -> Self {
        let globs = |l: &[String]| Patterns::parse(l.iter().map(String::as_str));
        Grants {
            servers: (!servers.is_empty()).then(|| servers.iter().cloned().collect()),
            tools: globs(tools),
            prompts: globs(prompts),
            resources: globs(resources),
        }
    }

    /// What any of `parts` grants (allow-only grants, as OAuth scopes map to): the union of
    /// their servers, and per kind the union of their allows, a part that names no pattern of
    /// a kind allowing every item of its servers. Nothing, for no parts.
    pub(crate) fn union(parts: &[&Grants], separator: &str) -> Grants {
        if parts.is_empty() {
            return Grants { servers: Some(BTreeSet::new()), ..Grants::default() };
        }
        let servers = parts.iter().try_fold(BTreeSet::new(), |mut acc, g| {
            g.servers.as_ref().map(|s| {
                acc.extend(s.iter().cloned());
                acc
            })
        });
        let kind = |k: GrantKind| {
            let mut allow = Vec::new();
            for g in parts {
                let p = g.patterns(k);
                if p.allow.is_empty() {
                    match &g.servers {
                        // Every item of every server: nothing to restrict for this kind.
                        None => return Patterns::default(),
                        Some(s) => allow.extend(s.iter().map(|s| Glob::new(&format!("{s}{separator}*")))),
                    }
                } else {
                    allow.extend(p.allow.iter().cloned());
                }
            }
            if allow.is_empty() {
                // Parts that reach no server: a pattern nothing matches keeps the kind closed.
                allow.push(Glob::new(""));
            }
            Patterns { allow, deny: Vec::new() }
        };
        Grants {
            servers,
            tools: kind(GrantKind::Tool),
            prompts: kind(GrantKind::Prompt),
            resources: kind(GrantKind::Resource),
        }
    }

    /// Whether a server may be reached at all.
    pub(crate) fn reaches(&self, server: &str) -> bool {
        self.servers.as_ref().is_none_or(|s| s.contains(server))
    }

    /// Whether everything `other` grants, these grant too: its servers a subset of these, its
    /// patterns of each kind covered by these.
    pub(crate) fn covers(&self, other: &Grants) -> bool {
        let servers = match (&self.servers, &other.servers) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.is_subset(mine),
        };
        servers
            && self.tools.covers(&other.tools)
            && self.prompts.covers(&other.prompts)
            && self.resources.covers(&other.resources)
    }

    /// The patterns of a kind.
    pub(crate) fn patterns(&self, kind: GrantKind) -> &Patterns {
        match kind {
            GrantKind::Tool => &self.tools,
            GrantKind::Prompt => &self.prompts,
            GrantKind::Resource => &self.resources,
        }
    }

    /// Whether an item (its server and its name or URI on that server) may be used.
    pub(crate) fn allows(&self, kind: GrantKind, server: &str, separator: &str, name: &str) -> bool {
        if !self.reaches(server) {
            return false;
        }
        let p = self.patterns(kind);
        if p.is_open() {
            return true;
        }
        // The aggregated name, assembled on the stack when short (lists check every item).
        let mut buf = [0u8; 256];
        let len = server.len() + separator.len() + name.len();
        if let Some(full) = buf.get_mut(..len) {
            let (a, rest) = full.split_at_mut(server.len());
            let (b, c) = rest.split_at_mut(separator.len());
            a.copy_from_slice(server.as_bytes());
            b.copy_from_slice(separator.as_bytes());
            c.copy_from_slice(name.as_bytes());
            if let Ok(full) = std::str::from_utf8(full) {
                return p.allows(full);
            }
        }
        p.allows(&format!("{server}{separator}{name}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn scope_grants_add_up() {
        let files = Grants::from_lists(&["files".into()], &["files__read_*".into()], &[], &[]);
        let git = Grants::from_lists(&["git".into()], &[], &[], &[]);
        let u = Grants::union(&[&files, &git], "__");
        assert!(u.reaches("files") && u.reaches("git") && !u.reaches("db"));
        assert!(
            u.allows(GrantKind::Tool, "files", "__", "read_a") && !u.allows(GrantKind::Tool, "files", "__", "write")
        );
        assert!(u.allows(GrantKind::Tool, "git", "__", "anything"));
        assert!(u.allows(GrantKind::Prompt, "files", "__", "p") && u.allows(GrantKind::Resource, "git", "__", "x://y"));
        let none = Grants::union(&[], "__");
        assert!(!none.reaches("files"));
        let all = Grants::union(&[&Grants::all(), &files], "__");
        assert!(all.reaches("db") && all.allows(GrantKind::Tool, "db", "__", "x"));
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn covers_is_a_sound_subset_check() {
        let p = |l: &[&str]| Patterns::parse(l.iter().copied());
        assert!(p(&["a__*"]).covers(&p(&["a__read_*", "a__x"])));
        assert!(!p(&["a__*"]).covers(&p(&["*"])));
        assert!(!p(&["a__*"]).covers(&p(&[])), "everything is not a subset of a__*");
        assert!(!p(&["a__?"]).covers(&p(&["a__*"])));
        assert!(p(&["a__?"]).covers(&p(&["a__?", "a__b"])));
        assert!(!p(&["*", "!a__secret"]).covers(&p(&["a__*"])), "the deny must be kept");
        assert!(p(&["*", "!a__secret"]).covers(&p(&["a__*", "!a__secret"])));
        assert!(p(&[]).covers(&p(&["!x"])));
        let g = |servers: &[&str]| {
            Grants::from_lists(&servers.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &[], &[], &[])
        };
        assert!(g(&[]).covers(&g(&["a"])) && g(&["a", "b"]).covers(&g(&["a"])));
        assert!(!g(&["a"]).covers(&g(&[])) && !g(&["a"]).covers(&g(&["a", "b"])));
    }

    proptest! {
        /// Whenever `covers` says yes, no name matched by the covered glob escapes the cover.
        #[test]
        fn a_covered_glob_matches_nothing_the_cover_does_not(g in "[ab*?]{0,5}", p in "[ab*?]{0,5}", s in "[ab]{0,6}") {
            let (gc, pc): (Vec<char>, Vec<char>) = (g.chars().collect(), p.chars().collect());
            if glob_covers(&gc, &pc) && Glob::new(&p).matches(&s) {
                prop_assert!(Glob::new(&g).matches(&s), "{g} covers {p} but not {s}");
            }
        }
    }

    #[test]
    fn globs() {
        assert!(Glob::new("files__read_*").matches("files__read_file"));
        assert!(Glob::new("files__read_*").matches("files__read_"));
        assert!(!Glob::new("files__read_*").matches("files__write"));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*a*b").matches("xxaxxbab"));
    }

    #[test]
    fn deny_wins_whatever_the_order() {
        let p = Patterns::parse(["!files__delete*", "files__*"]);
        assert!(p.allows("files__read"));
        assert!(!p.allows("files__delete_all"));
        let only_deny = Patterns::parse(["!db__*"]);
        assert!(only_deny.allows("files__x") && !only_deny.allows("db__drop"));
    }

    fn regex_of(glob: &str) -> String {
        let mut r = String::from("^");
        for c in glob.chars() {
            match c {
                '*' => r.push_str(".*"),
                '?' => r.push('.'),
                c => r.push_str(&regex_escape(c)),
            }
        }
        r.push('$');
        r
    }

    fn regex_escape(c: char) -> String {
        if c.is_ascii_alphanumeric() || c == '_' { c.to_string() } else { format!("\\{c}") }
    }

    /// A tiny backtracking regex matcher for the oracle (only `.`, `.*`, literals, escapes).
    fn regex_matches(re: &str, s: &str) -> bool {
        fn go(p: &[char], s: &[char]) -> bool {
            if p.is_empty() || p == ['$'] {
                return s.is_empty();
            }
            let (atom, rest): (Option<char>, &[char]) = match p[0] {
                '\\' => (Some(p[1]), &p[2..]),
                '.' => (None, &p[1..]),
                c => (Some(c), &p[1..]),
            };
            let one = |c: &char| atom.is_none_or(|a| a == *c);
            if rest.first() == Some(&'*') {
                let rest = &rest[1..];
                let mut i = 0;
                loop {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if i < s.len() && one(&s[i]) {
                        i += 1;
                    } else {
                        return false;
                    }
                }
            }
            !s.is_empty() && one(&s[0]) && go(rest, &s[1..])
        }
        let p: Vec<char> = re.trim_start_matches('^').chars().collect();
        let s: Vec<char> = s.chars().collect();
        go(&p, &s)
    }

    proptest! {
        #[test]
        fn glob_agrees_with_a_regex_oracle(glob in "[ab_*?]{0,8}", name in "[ab_]{0,10}") {
            prop_assert_eq!(Glob::new(&glob).matches(&name), regex_matches(&regex_of(&glob), &name));
        }

        #[test]
        fn deny_always_wins(allow in "[ab*]{0,4}", deny in "[ab*]{0,4}", name in "[ab]{0,6}") {
            let p = Patterns::parse([allow.as_str(), &format!("!{deny}")]);
            if Glob::new(&deny).matches(&name) {
                prop_assert!(!p.allows(&name));
            } else {
                prop_assert_eq!(p.allows(&name), Glob::new(&allow).matches(&name));
            }
        }
    }
}
