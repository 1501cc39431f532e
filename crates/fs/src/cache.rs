//! The per-user cache directory, one rule for every cache.

use std::ffi::OsString;
use std::path::PathBuf;

/// The root of glatrain's caches: `$GLATRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/glatrain`, else
/// `$HOME/.cache/glatrain` (empty variables count as unset); `None` when none is set.
pub fn cache_root() -> Option<PathBuf> {
    root_from(
        std::env::var_os("GLATRAIN_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// The cache for one kind of entry, `<cache_root>/<name>` (e.g. `kernels`, `preflight`).
pub fn cache_dir(name: &str) -> Option<PathBuf> {
    cache_root().map(|root| root.join(name))
}

fn root_from(
    glatrain: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(glatrain)
        .or_else(|| set(xdg).map(|d| d.join("glatrain")))
        .or_else(|| set(home).map(|d| d.join(".cache").join("glatrain")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(g: Option<&str>, x: Option<&str>, h: Option<&str>) -> Option<PathBuf> {
        root_from(g.map(Into::into), x.map(Into::into), h.map(Into::into))
    }

    #[test]
    fn the_variable_then_xdg_then_home() {
        assert_eq!(root(Some("/c"), Some("/x"), Some("/h")), Some("/c".into()));
        assert_eq!(
            root(None, Some("/x"), Some("/h")),
            Some("/x/glatrain".into())
        );
        assert_eq!(
            root(Some(""), None, Some("/h")),
            Some("/h/.cache/glatrain".into())
        );
        assert_eq!(root(None, Some(""), Some("")), None);
    }
}
