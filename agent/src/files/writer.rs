//! SVIDs as files, one generation at a time: each update is written whole
//! into a new directory `.oxid-gen-<n>`, synced, and then published by
//! renaming one symlink, `current`, over the last. A reader that resolves
//! `current` once reads a key and a certificate of the same generation,
//! never the new key with the old certificate (which two renames in one
//! directory would show for a moment). `svid_key.pem` holds the key and
//! the chain in one file for programs that read both from one path.
//!
//! The directory is refused if another user could write to it (they could
//! swap the files a program trusts), and a write that fails leaves the
//! last good generation in place.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// Generations kept besides `current`: a reader that resolved `current`
/// just before a switch still finds its files.
const KEEP_OLD: usize = 2;

const GEN_PREFIX: &str = ".oxid-gen-";

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The directory is unusable or unsafe.
    #[error("--write {dir}: {reason}")]
    Directory {
        /// The directory given.
        dir: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing a generation failed; the previous one stays current.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory being written.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// One update's contents, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Contents {
    /// Leaf, then intermediates.
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: zeroize::Zeroizing<String>,
    /// The own trust domain's X.509 authorities.
    pub bundle_pem: String,
    /// Federated trust domains' authorities, in trust-domain order.
    pub federated_pem: Vec<String>,
    /// JWT-SVIDs, one per `--jwt-audience`, in the order given.
    pub jwt_svids: Vec<zeroize::Zeroizing<String>>,
    /// The own trust domain's JWT bundle (JWKS), when JWT-SVIDs are asked for.
    pub jwt_bundle: Option<String>,
}

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contents")
            .field("federated", &self.federated_pem.len())
            .finish_non_exhaustive()
    }
}

/// File names, modes and group (`api watch` flags).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
    /// Mode of the certificate and bundle files.
    pub cert_mode: u32,
    /// Mode of the key and of `svid_key.pem`.
    pub key_mode: u32,
    /// Names of the SVID, key and bundle files.
    pub names: Names,
    /// Group the files are given (e.g. the group a server program runs
    /// as, with `key_mode` 0640), if not this user's.
    pub group: Option<u32>,
}

/// Names of the three files most programs are configured with; the
/// defaults are spire-agent's and spiffe-helper's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The X509-SVID chain.
    pub svid: String,
    /// Its key.
    pub key: String,
    /// The bundle.
    pub bundle: String,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            svid: SVID.into(),
            key: KEY.into(),
            bundle: BUNDLE.into(),
        }
    }
}

impl Names {
    /// Refuses names that are not plain file names, clash with each other
    /// or with the files the writer keeps for itself.
    pub fn check(&self) -> Result<(), String> {
        let all = [&self.svid, &self.key, &self.bundle];
        for name in all {
            let plain = !name.is_empty()
                && !name.contains('/')
                && name != "."
                && name != ".."
                && !name.starts_with(GEN_PREFIX)
                && !name.starts_with(".oxid-current")
                && name != "current"
                && name != COMBINED
                && name != JWT_BUNDLE
                && !name.starts_with("federated_bundle.")
                && !name.starts_with("jwt_svid.")
                && !name.chars().any(char::is_control);
            if !plain {
                return Err(format!(
                    "file name {name:?}: give a plain file name, not a path, and not one \
                     of the names the watcher keeps for itself"
                ));
            }
        }
        if self.svid == self.key || self.svid == self.bundle || self.key == self.bundle {
            return Err("the SVID, key and bundle file names must differ".into());
        }
        Ok(())
    }
}

/// The names inside a generation, the same as `api fetch x509 --write`.
pub const SVID: &str = "svid.pem";
/// The private key.
pub const KEY: &str = "svid.key";
/// The bundle.
pub const BUNDLE: &str = "bundle.pem";
/// Key and chain in one file.
pub const COMBINED: &str = "svid_key.pem";
/// The JWT bundle, as plain JWKS.
pub const JWT_BUNDLE: &str = "jwt_bundle.json";

/// Writes generations into one directory.
#[derive(Debug)]
pub struct Writer {
    layout: Layout,
    next: u64,
}

impl Writer {
    /// Checks `layout.dir` and finds the next generation number.
    pub fn open(layout: Layout) -> Result<Self, WriteError> {
        check_dir(&layout.dir)?;
        layout
            .names
            .check()
            .map_err(|reason| WriteError::Directory {
                dir: layout.dir.display().to_string(),
                reason,
            })?;
        if layout.key_mode & 0o007 != 0 {
            return Err(WriteError::Directory {
                dir: layout.dir.display().to_string(),
                reason: format!(
                    "--key-mode {:04o} lets every user read the private key",
                    layout.key_mode
                ),
            });
        }
        let next = generations(&layout.dir)?
            .last()
            .map_or(1, |(n, _)| n.saturating_add(1));
        Ok(Self { layout, next })
    }

    /// Writes `contents` as a new generation and makes it current; the
    /// path of the new generation.
    pub fn write(&mut self, contents: &Contents) -> Result<PathBuf, WriteError> {
        // Checked on every write: the directory may have been changed.
        check_dir(&self.layout.dir)?;
        let dir = &self.layout.dir;
        let name = format!("{GEN_PREFIX}{:012}", self.next);
        let generation = dir.join(&name);
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| WriteError::Io { path, source }
        };
        let _ = fs::remove_dir_all(&generation);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&generation)
            .map_err(io(&generation))?;
        let written = self.fill(&generation, contents).and_then(|()| {
            fs::File::open(&generation)
                .and_then(|d| d.sync_all())
                .map_err(io(&generation))?;
            switch(dir, &name)
        });
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&generation);
            return Err(e);
        }
        self.next += 1;
        self.link_names()?;
        self.prune();
        Ok(generation)
    }

    fn fill(&self, generation: &Path, c: &Contents) -> Result<(), WriteError> {
        let (cert, key) = (self.layout.cert_mode, self.layout.key_mode);
        let mut combined = zeroize::Zeroizing::new(c.key_pem.to_string());
        combined.push_str(&c.chain_pem);
        let names = &self.layout.names;
        let mut files: Vec<(String, &[u8], u32)> = vec![
            (names.svid.clone(), c.chain_pem.as_bytes(), cert),
            (names.key.clone(), c.key_pem.as_bytes(), key),
            (COMBINED.into(), combined.as_bytes(), key),
            (names.bundle.clone(), c.bundle_pem.as_bytes(), cert),
        ];
        for (n, pem) in c.federated_pem.iter().enumerate() {
            files.push((format!("federated_bundle.{n}.pem"), pem.as_bytes(), cert));
        }
        // A JWT-SVID is a bearer credential: the key's mode.
        for (n, token) in c.jwt_svids.iter().enumerate() {
            files.push((format!("jwt_svid.{n}.token"), token.as_bytes(), key));
        }
        if let Some(jwks) = &c.jwt_bundle {
            files.push((JWT_BUNDLE.into(), jwks.as_bytes(), cert));
        }
        for (name, bytes, mode) in files {
            let path = generation.join(name);
            write_file(&path, bytes, mode, self.layout.group).map_err(|source| WriteError::Io {
                path: path.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// `DIR/svid.pem` → `current/svid.pem` and the like, once, for programs
    /// configured with the directory's own names. Each such path is one
    /// lookup: two of them may straddle a switch, which `current/` read
    /// after resolving it, `svid_key.pem`, or a reload on signal avoid.
    fn link_names(&self) -> Result<(), WriteError> {
        let names = &self.layout.names;
        for name in [&names.svid, &names.key, COMBINED, &names.bundle] {
            let link = self.layout.dir.join(name);
            match fs::symlink_metadata(&link) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(WriteError::Io {
                        path: link.display().to_string(),
                        source,
                    });
                }
            }
            std::os::unix::fs::symlink(Path::new("current").join(name), &link).map_err(
                |source| WriteError::Io {
                    path: link.display().to_string(),
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Removes generations older than the last [`KEEP_OLD`] before current.
    fn prune(&self) {
        let Ok(all) = generations(&self.layout.dir) else {
            return;
        };
        let old = all.len().saturating_sub(KEEP_OLD + 1);
        for (_, path) in all.into_iter().take(old) {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Renames a new `current` symlink over the old one: one atomic step.
fn switch(dir: &Path, generation: &str) -> Result<(), WriteError> {
    let tmp = dir.join(".oxid-current.tmp");
    let current = dir.join("current");
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| WriteError::Io { path, source }
    };
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(generation, &tmp).map_err(io(&tmp))?;
    fs::rename(&tmp, &current).map_err(io(&current))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, group: Option<u32>) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o700)
        .open(path)?;
    // The group is set before the group bits, and both before the secret
    // is written: no other user can read a partial or a group-less file.
    if let Some(gid) = group {
        rustix::fs::fchown(&file, None, Some(rustix::fs::Gid::from_raw(gid)))?;
    }
    // The umask may have taken bits the operator asked for.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The generations in `dir`, oldest first.
fn generations(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WriteError> {
    let entries = fs::read_dir(dir).map_err(|source| WriteError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut all: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(GEN_PREFIX)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    all.sort();
    Ok(all)
}

/// A directory this user owns (or root does) and no one else may write.
fn check_dir(dir: &Path) -> Result<(), WriteError> {
    check_dir_for(dir, rustix::process::geteuid().as_raw())
}

/// A directory `me` owns (or root does) and no one else may write: what
/// the writer running as `me` accepts (the agent checks its `[[files]]`
/// writers' directories with it before starting them).
pub fn check_dir_for(dir: &Path, me: u32) -> Result<(), WriteError> {
    let refuse = |reason: String| WriteError::Directory {
        dir: dir.display().to_string(),
        reason,
    };
    let meta = fs::symlink_metadata(dir).map_err(|e| {
        refuse(if e.kind() == std::io::ErrorKind::NotFound {
            "no such directory; create it first".into()
        } else {
            e.to_string()
        })
    })?;
    if !meta.is_dir() {
        return Err(refuse(
            "not a directory (a symlink to one is refused too: give the real path)".into(),
        ));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(format!(
            "owned by uid {}, not by this user ({me}) or root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "mode {:04o}: group or others may write to it and replace the files; \
             chmod go-w it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(tag: &str) -> Contents {
        Contents {
            chain_pem: format!("chain {tag}\n"),
            key_pem: zeroize::Zeroizing::new(format!("key {tag}\n")),
            bundle_pem: format!("bundle {tag}\n"),
            federated_pem: vec![format!("fed {tag}\n")],
            jwt_svids: vec![zeroize::Zeroizing::new(format!("jwt {tag}"))],
            jwt_bundle: Some(format!("{{\"keys\":[\"{tag}\"]}}")),
        }
    }

    fn layout(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_owned(),
            cert_mode: 0o644,
            key_mode: 0o600,
            names: Names::default(),
            group: None,
        }
    }

    #[test]
    fn names_and_group_are_the_operators() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut l = layout(dir.path());
        l.names = Names {
            svid: "tls.crt".into(),
            key: "tls.key".into(),
            bundle: "ca.crt".into(),
        };
        l.key_mode = 0o640;
        l.group = Some(4242);
        Writer::open(l).unwrap().write(&contents("n")).unwrap();
        let meta = fs::metadata(dir.path().join("tls.key")).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (4242, 0o640));
        assert_eq!(
            fs::read_to_string(dir.path().join("current/ca.crt")).unwrap(),
            "bundle n\n"
        );
        for bad in [
            "",
            "a/b",
            "..",
            "current",
            "svid_key.pem",
            ".oxid-gen-1",
            "jwt_svid.0.token",
        ] {
            let names = Names {
                svid: bad.into(),
                ..Names::default()
            };
            assert!(names.check().is_err(), "{bad:?}");
        }
        let same = Names {
            key: SVID.into(),
            ..Names::default()
        };
        assert!(same.check().is_err());
    }

    #[test]
    fn each_write_is_a_new_generation_behind_one_symlink() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut w = Writer::open(layout(dir.path())).unwrap();
        for i in 0..5 {
            w.write(&contents(&i.to_string())).unwrap();
            let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap();
            assert_eq!(read("current/svid.pem"), format!("chain {i}\n"));
            assert_eq!(read("svid.key"), format!("key {i}\n"));
            assert_eq!(read("svid_key.pem"), format!("key {i}\nchain {i}\n"));
            assert_eq!(read("current/federated_bundle.0.pem"), format!("fed {i}\n"));
        }
        let mode = |name: &str| {
            fs::metadata(dir.path().join("current").join(name))
                .unwrap()
                .mode()
                & 0o777
        };
        assert_eq!(
            (mode(KEY), mode(COMBINED), mode(SVID)),
            (0o600, 0o600, 0o644)
        );
        // Current and the two before it are kept.
        assert_eq!(generations(dir.path()).unwrap().len(), 3);
        // A new writer (agent restart) continues the numbering.
        let mut again = Writer::open(layout(dir.path())).unwrap();
        let path = again.write(&contents("x")).unwrap();
        assert!(
            path.ends_with(".oxid-gen-000000000006"),
            "{}",
            path.display()
        );
    }

    #[test]
    fn unsafe_directories_and_modes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let e = Writer::open(layout(dir.path())).unwrap_err().to_string();
        assert!(e.contains("group or others may write"), "{e}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let mut open_key = layout(dir.path());
        open_key.key_mode = 0o644;
        let e = Writer::open(open_key).unwrap_err().to_string();
        assert!(e.contains("lets every user read the private key"), "{e}");
        let e = Writer::open(layout(&dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = Writer::open(layout(&link)).unwrap_err().to_string();
        assert!(e.contains("a symlink to one is refused"), "{e}");
    }

    #[test]
    fn a_failed_write_keeps_the_last_good_generation() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let mut w = Writer::open(layout(dir.path())).unwrap();
        w.write(&contents("good")).unwrap();
        // The directory turns unsafe: the write is refused, nothing changes.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(w.write(&contents("bad")).is_err());
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("svid.pem")).unwrap(),
            "chain good\n"
        );
    }
}
