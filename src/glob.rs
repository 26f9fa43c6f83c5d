//! Shell-style name patterns (`*` any run, `?` one character, everything else
//! literal, case-sensitive) for VM selection, schedules and `ferry files find`.
//!
//! Must not: know what it matches (VM names, file names); no I/O.

/// Whether `name` matches the glob `pattern`. At most O(pattern × name) steps:
/// an iterative matcher that backtracks only to the last star, so hostile
/// patterns cannot make it exponential.
pub fn glob(pattern: &str, name: &str) -> bool {
    // Most job patterns are plain VM names: no allocation for those.
    if !pattern.contains(['*', '?']) {
        return pattern == name;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        // A star is always a wildcard, also where the name holds a literal '*'.
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("web-*", "web-01", true),
            ("web-*", "web-", true),
            ("web-*", "db-01", false),
            ("db-??", "db-01", true),
            ("db-??", "db-1", false),
            ("*", "", true),
            ("*", "web01", true),
            ("", "", true),
            ("", "x", false),
            ("*01", "web01", true),
            ("*b*1", "web01", true),
            ("web01", "web011", false),
            ("*-template", "linux-template", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("Web-*", "web-01", false),
            ("é?", "éü", true),
            ("*", "*a", true),
            ("a*", "a*", true),
            ("*.txt", "notes 2024 é.txt", true),
        ] {
            assert_eq!(glob(p, n), want, "{p:?} vs {n:?}");
        }
        // Pathological patterns stay fast.
        let long = "a".repeat(5000);
        assert!(!glob(&format!("{}b", "*a".repeat(100)), &long));
    }

    proptest::proptest! {
        #[test]
        fn star_matches_everything_and_a_literal_matches_itself(s in "[a-z?*-]{0,12}") {
            proptest::prop_assert!(glob("*", &s));
            let literal: String = s.chars().filter(|c| *c != '*' && *c != '?').collect();
            proptest::prop_assert!(glob(&literal, &literal));
        }

        #[test]
        fn a_pattern_without_wildcards_is_plain_equality(p in "[a-c-]{0,6}", n in "[a-c-]{0,6}") {
            proptest::prop_assert_eq!(glob(&p, &n), p == n);
        }
    }
}
