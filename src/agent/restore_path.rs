//! Where restores requested through the agent API may write on the agent host:
//! only at or under one of the tenant's `restore_dirs` (docs/configuration.md),
//! whatever the request names.
//!
//! Owns the path check and nothing else: a requested path must be absolute, have
//! no `..` component, and resolve (the longest existing ancestor canonicalized,
//! so symlinks are followed, then the rest appended) to a location at or under
//! one of the equally resolved allowed directories. Must not create anything.
//! The writers close the gap between this check and their writes: the job
//! re-resolves the directory once created (`job::runner::prepare_restore_dir`),
//! creates images with `O_EXCL` (`job::restore_new_file`), and file restores
//! never write through a symlink (`files::restore`).

use std::path::{Component, Path, PathBuf};

/// Why a requested restore path is refused; `Display` says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathRefusal {
    /// The tenant has no `restore_dirs`.
    #[error("no restore_dirs are configured for this tenant")]
    NoneConfigured,
    /// Not an absolute path.
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// A `..` component.
    #[error("{0} contains a `..` component")]
    ParentComponent(PathBuf),
    /// A part of the path exists but cannot be resolved (a dangling symlink, a
    /// file where a directory is needed, no permission).
    #[error("{path} cannot be resolved: {reason}")]
    Unresolvable {
        /// The requested path.
        path: PathBuf,
        /// What stopped the resolution.
        reason: String,
    },
    /// It resolves outside every allowed directory.
    #[error("{path} resolves to {resolved}, which is not at or under an allowed directory")]
    Outside {
        /// The requested path.
        path: PathBuf,
        /// Where it resolves to (symlinks followed).
        resolved: PathBuf,
    },
}

/// `path` with symlinks resolved as far as it exists: the longest existing
/// ancestor canonicalized, with the components that do not exist yet appended.
/// `path` must be absolute and free of `..` (a `..` after a not-yet-existing
/// component could not be resolved honestly); `.` components are dropped.
pub(crate) fn resolve(path: &Path) -> Result<PathBuf, PathRefusal> {
    if !path.is_absolute() {
        return Err(PathRefusal::NotAbsolute(path.to_path_buf()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(PathRefusal::ParentComponent(path.to_path_buf()));
    }
    let unresolvable = |reason: String| PathRefusal::Unresolvable {
        path: path.to_path_buf(),
        reason,
    };
    let mut existing = path.to_path_buf();
    let mut missing: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut resolved) => {
                for name in missing.iter().rev() {
                    resolved.push(name);
                }
                return Ok(resolved);
            }
            Err(e) => {
                // Only a component that is really absent may be created later.
                // Anything present that does not resolve (a dangling symlink, a
                // file in the middle, no permission) is refused.
                match std::fs::symlink_metadata(&existing) {
                    Err(m) if m.kind() == std::io::ErrorKind::NotFound => {}
                    Err(m) => return Err(unresolvable(format!("{}: {m}", existing.display()))),
                    Ok(_) => return Err(unresolvable(format!("{}: {e}", existing.display()))),
                }
                match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        missing.push(name.to_os_string());
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(unresolvable(format!("{}: {e}", existing.display()))),
                }
            }
        }
    }
}

/// Check that a restore may write to `requested`: it must resolve to a location
/// at or under one of `allowed` (each resolved the same way, a relative one
/// against the working directory, as the configuration leaves paths of a file
/// named without a directory; one that cannot be resolved allows nothing).
/// Returns the resolved path, which the job should write to (symlinks already
/// followed).
pub(crate) fn check(requested: &Path, allowed: &[PathBuf]) -> Result<PathBuf, PathRefusal> {
    if allowed.is_empty() {
        return Err(PathRefusal::NoneConfigured);
    }
    let resolved = resolve(requested)?;
    let inside = allowed
        .iter()
        .filter_map(|a| std::path::absolute(a).ok())
        .filter_map(|a| resolve(&a).ok())
        .any(|a| resolved.starts_with(&a));
    if inside {
        Ok(resolved)
    } else {
        Err(PathRefusal::Outside {
            path: requested.to_path_buf(),
            resolved,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A canonical temporary directory with `restore/` (allowed) in it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let allowed = root.join("restore");
        std::fs::create_dir(&allowed).unwrap();
        (t, root, allowed)
    }

    #[test]
    fn inside_the_allowed_directory_is_accepted() {
        let (_t, _root, allowed) = setup();
        std::fs::create_dir(allowed.join("a")).unwrap();
        let p = allowed.join("a");
        assert_eq!(check(&p, std::slice::from_ref(&allowed)), Ok(p.clone()));
        // Not yet existing subdirectories, several levels deep.
        let p = allowed.join("a/new/deeper");
        assert_eq!(check(&p, std::slice::from_ref(&allowed)), Ok(p.clone()));
        let p = allowed.join("fresh");
        assert_eq!(check(&p, std::slice::from_ref(&allowed)), Ok(p.clone()));
        // `.` components and a trailing slash change nothing.
        let dotted = PathBuf::from(format!("{}/./a/", allowed.display()));
        assert_eq!(
            check(&dotted, std::slice::from_ref(&allowed)),
            Ok(allowed.join("a"))
        );
    }

    #[test]
    fn the_allowed_directory_itself_is_accepted() {
        let (_t, _root, allowed) = setup();
        assert_eq!(
            check(&allowed, std::slice::from_ref(&allowed)),
            Ok(allowed.clone())
        );
    }

    #[test]
    fn a_sibling_with_a_common_prefix_is_refused() {
        let (_t, root, allowed) = setup();
        std::fs::create_dir(root.join("restore-evil")).unwrap();
        for p in [
            root.join("restore-evil"),
            root.join("restore-evil/x"),
            root.join("restorex"),
        ] {
            assert!(
                matches!(
                    check(&p, std::slice::from_ref(&allowed)),
                    Err(PathRefusal::Outside { .. })
                ),
                "{}",
                p.display()
            );
        }
        // And the parent of the allowed directory.
        assert!(matches!(
            check(&root, std::slice::from_ref(&allowed)),
            Err(PathRefusal::Outside { .. })
        ));
    }

    #[test]
    fn parent_components_are_refused_even_when_they_would_stay_inside() {
        let (_t, _root, allowed) = setup();
        std::fs::create_dir(allowed.join("a")).unwrap();
        for p in [
            allowed.join("../etc"),
            allowed.join("a/../b"),
            allowed.join("new/.."),
        ] {
            assert_eq!(
                check(&p, std::slice::from_ref(&allowed)),
                Err(PathRefusal::ParentComponent(p.clone()))
            );
        }
    }

    #[test]
    fn relative_paths_are_refused() {
        let (_t, _root, allowed) = setup();
        for p in ["restore", "restore/a", "./restore", ""] {
            assert_eq!(
                check(Path::new(p), std::slice::from_ref(&allowed)),
                Err(PathRefusal::NotAbsolute(PathBuf::from(p)))
            );
        }
    }

    #[test]
    fn symlinks_escaping_the_allowed_directory_are_refused() {
        let (_t, root, allowed) = setup();
        let outside = root.join("outside");
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, allowed.join("escape")).unwrap();
        symlink("../outside", allowed.join("relative-escape")).unwrap();
        for p in [
            allowed.join("escape"),
            allowed.join("escape/new/dir"),
            allowed.join("relative-escape/x"),
        ] {
            match check(&p, std::slice::from_ref(&allowed)) {
                Err(PathRefusal::Outside { resolved, .. }) => {
                    assert!(resolved.starts_with(&outside), "{}", resolved.display())
                }
                other => panic!("{}: {other:?}", p.display()),
            }
        }
        // A dangling symlink (its target could be created outside) is refused.
        symlink(root.join("not-yet"), allowed.join("dangling")).unwrap();
        for p in [allowed.join("dangling"), allowed.join("dangling/x")] {
            assert!(
                matches!(
                    check(&p, std::slice::from_ref(&allowed)),
                    Err(PathRefusal::Unresolvable { .. })
                ),
                "{}",
                p.display()
            );
        }
        assert!(!root.join("not-yet").exists());
    }

    #[test]
    fn symlinks_staying_inside_are_followed() {
        let (_t, _root, allowed) = setup();
        std::fs::create_dir(allowed.join("real")).unwrap();
        symlink("real", allowed.join("alias")).unwrap();
        assert_eq!(
            check(&allowed.join("alias/x"), std::slice::from_ref(&allowed)),
            Ok(allowed.join("real/x"))
        );
    }

    #[test]
    fn allowed_directories_are_resolved_too() {
        let (_t, root, allowed) = setup();
        // Configured through a symlink: the real location is what counts.
        symlink(&allowed, root.join("link-to-restore")).unwrap();
        let via_link = vec![root.join("link-to-restore")];
        assert_eq!(check(&allowed.join("a"), &via_link), Ok(allowed.join("a")));
        assert!(matches!(
            check(&root.join("elsewhere"), &via_link),
            Err(PathRefusal::Outside { .. })
        ));
        // An allowed directory that does not exist yet still confines.
        let later = vec![root.join("later/restores")];
        assert_eq!(
            check(&root.join("later/restores/x"), &later),
            Ok(root.join("later/restores/x"))
        );
        assert!(matches!(
            check(&root.join("later/other"), &later),
            Err(PathRefusal::Outside { .. })
        ));
        // One of several.
        let two = vec![root.join("nope"), allowed.clone()];
        assert_eq!(check(&allowed.join("b"), &two), Ok(allowed.join("b")));
    }

    #[test]
    fn no_allowed_directories_refuses_everything() {
        let (_t, _root, allowed) = setup();
        assert_eq!(check(&allowed, &[]), Err(PathRefusal::NoneConfigured));
        assert_eq!(check(Path::new("/"), &[]), Err(PathRefusal::NoneConfigured));
    }

    #[test]
    fn a_file_in_the_middle_is_refused() {
        let (_t, _root, allowed) = setup();
        std::fs::write(allowed.join("file"), b"x").unwrap();
        assert!(matches!(
            check(&allowed.join("file/sub"), std::slice::from_ref(&allowed)),
            Err(PathRefusal::Unresolvable { .. })
        ));
    }

    #[test]
    fn nothing_is_created() {
        let (_t, _root, allowed) = setup();
        check(&allowed.join("x/y/z"), std::slice::from_ref(&allowed)).unwrap();
        assert!(!allowed.join("x").exists());
    }
}
