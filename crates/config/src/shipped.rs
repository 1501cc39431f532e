//! The configs of `configs/`, compiled into the binary (as the corpus is), so that
//! `glatrain --config gla-340m` works from any directory. [`crate::load`] falls back to them when
//! no file of the given path exists; a file always wins.

use std::path::{Component, Path};

/// One shipped config: its name (the file name without `.toml`) and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShippedConfig {
    pub name: &'static str,
    pub text: &'static str,
}

impl ShippedConfig {
    /// The first line of the file's leading comment: what the config is for, in one line.
    pub fn description(&self) -> &'static str {
        self.text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix('#'))
            .map_or("", str::trim)
    }

    /// The origin that names it in messages and in the resolved config.
    pub fn origin(&self) -> String {
        format!("{}.toml (built in)", self.name)
    }
}

macro_rules! shipped {
    ($($name:literal),* $(,)?) => {
        &[$(ShippedConfig {
            name: $name,
            text: include_str!(concat!("../../../configs/", $name, ".toml")),
        }),*]
    };
}

/// Every config of `configs/`, sorted by name (a test checks the list against the directory).
pub const SHIPPED: &[ShippedConfig] = shipped![
    "gla-1.3b",
    "gla-340m",
    "gla-340m-128k",
    "gla-340m-64k",
    "gla-tiny",
    "mamba-370m",
    "mamba-tiny",
    "transformer-340m",
    "transformer-tiny",
];

/// The shipped config a bare name (`gla-340m` or `gla-340m.toml`, no directory) stands for.
pub fn find(path: &Path) -> Option<&'static ShippedConfig> {
    let mut components = path.components();
    let (Some(Component::Normal(name)), None) = (components.next(), components.next()) else {
        return None;
    };
    let name = name.to_str()?;
    let name = name.strip_suffix(".toml").unwrap_or(name);
    SHIPPED.iter().find(|c| c.name == name)
}

/// The names of the shipped configs, comma-separated.
pub fn names() -> String {
    SHIPPED
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_the_configs_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut on_disk: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        on_disk.sort();
        let shipped: Vec<(String, String)> = SHIPPED
            .iter()
            .map(|c| (c.name.to_string(), c.text.to_string()))
            .collect();
        assert_eq!(shipped, on_disk);
    }

    #[test]
    fn each_starts_with_a_one_line_description() {
        for config in SHIPPED {
            let mut lines = config.text.lines();
            let first = lines.next().unwrap();
            let description = config.description();
            assert!(
                first.starts_with("# ") && description.ends_with('.') && description.len() <= 90,
                "{}: the first line should be a one-line description: {first:?}",
                config.name
            );
            assert_eq!(
                lines.next(),
                Some("#"),
                "{}: a bare `#` line after it",
                config.name
            );
        }
    }

    #[test]
    fn bare_names_find_them_and_paths_do_not() {
        assert_eq!(find(Path::new("gla-340m")).unwrap().name, "gla-340m");
        assert_eq!(find(Path::new("gla-tiny.toml")).unwrap().name, "gla-tiny");
        assert!(find(Path::new("configs/gla-340m.toml")).is_none());
        assert!(find(Path::new("./gla-340m.toml")).is_none());
        assert!(find(Path::new("gla-341m")).is_none());
        assert!(find(Path::new("")).is_none());
        assert_eq!(SHIPPED[1].origin(), "gla-340m.toml (built in)");
    }
}
