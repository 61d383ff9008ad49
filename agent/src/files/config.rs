//! `[[files]]` in agent.toml: SVIDs kept as files for a program, by a
//! writer the agent starts and supervises (see `supervise`). Each table is
//! what one `oxid-agent api watch --write DIR` would be given, plus the
//! user it runs as. Everything is checked when the file is read, so a bad
//! table is refused by `oxid-agent validate` and at start, never by a
//! writer failing over and over later.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::writer::Names;

/// One `[[files]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesFile {
    /// The user the writer runs as, a name or a uid: its SVIDs are that
    /// user's, attested like any workload of it.
    pub user: String,
    /// The writer's group, a name or a gid [default: the user's primary
    /// group]; the files get it too.
    pub group: Option<String>,
    /// The directory (absolute; owned by the user or root, not writable by
    /// group or others).
    pub dir: PathBuf,
    /// Which SVID, when the user has several [default: the first].
    pub spiffe_id: Option<String>,
    /// Mode of the certificate and bundle files, octal text [default
    /// "0644"].
    pub cert_mode: Option<String>,
    /// Mode of the key files, octal text [default "0600"].
    pub key_mode: Option<String>,
    /// Name of the X509-SVID file [default svid.pem].
    pub svid_file_name: Option<String>,
    /// Name of the key file [default svid.key].
    pub key_file_name: Option<String>,
    /// Name of the bundle file [default bundle.pem].
    pub bundle_file_name: Option<String>,
    /// JWT-SVIDs to keep, one per audience (jwt_svid.N.token).
    #[serde(default)]
    pub jwt_audiences: Vec<String>,
    /// Write the federated trust domains' bundles (federated_bundle.N.pem)
    /// when the entry federates with them [default true].
    pub federated_bundles: Option<bool>,
    /// Signal sent after each update to the process in `pid_file`.
    pub signal: Option<String>,
    /// The process to signal: a file holding its PID.
    pub pid_file: Option<PathBuf>,
    /// Run through `sh -c` (as the user) after each update.
    pub reload_command: Option<String>,
}

/// A checked `[[files]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesTable {
    /// The user as written, for messages.
    pub user: String,
    /// The writer's uid.
    pub uid: u32,
    /// The writer's gid, which the files get.
    pub gid: u32,
    /// The directory.
    pub dir: PathBuf,
    /// `api watch` arguments after `--write DIR --socket-path S`.
    args: Vec<OsString>,
}

/// Most JWT audiences one table may ask for (the Workload API's own cap).
const MAX_AUDIENCES: usize = 32;

impl FilesTable {
    /// The writer's command line (after the agent binary).
    pub fn argv(&self, socket: &Path) -> Vec<OsString> {
        let mut argv: Vec<OsString> = ["api", "watch", "--write"]
            .into_iter()
            .map(OsString::from)
            .collect();
        argv.push(self.dir.clone().into_os_string());
        argv.push("--socket-path".into());
        argv.push(socket.as_os_str().to_owned());
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// Checks every table; `n` in messages counts from 1, in file order.
pub fn resolve(tables: &[FilesFile]) -> Result<Vec<FilesTable>, String> {
    let passwd = read_db("/etc/passwd", tables)?;
    let group = read_db("/etc/group", tables)?;
    let mut out: Vec<FilesTable> = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let n = i + 1;
        let t = resolve_one(table.clone(), &passwd, &group)
            .map_err(|e| format!("[[files]] #{n}: {e}"))?;
        if let Some(same) = out.iter().position(|o| o.dir == t.dir) {
            return Err(format!(
                "[[files]] #{n}: dir {} is also table #{}'s; two writers would replace each \
                 other's files",
                t.dir.display(),
                same + 1
            ));
        }
        out.push(t);
    }
    Ok(out)
}

/// `/etc/passwd` or `/etc/group`, read only when some table needs it.
fn read_db(path: &str, tables: &[FilesFile]) -> Result<String, String> {
    if tables.is_empty() {
        return Ok(String::new());
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        // Numeric users and groups need neither file.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("[[files]]: cannot read {path}: {e}")),
    }
}

fn resolve_one(t: FilesFile, passwd: &str, groups: &str) -> Result<FilesTable, String> {
    let (uid, primary) = user_ids(passwd, &t.user)?;
    let gid = match &t.group {
        Some(g) => group_id(groups, g)?,
        None => primary.ok_or_else(|| {
            format!(
                "user {:?} has no /etc/passwd entry to take a primary group from; give group",
                t.user
            )
        })?,
    };
    let dir = checked_path("dir", &t.dir)?;
    let mut args: Vec<OsString> = vec!["--group".into(), gid.to_string().into()];
    if t.federated_bundles == Some(false) {
        args.push("--no-federated-bundles".into());
    }
    let mut flag = |name: &str, value: OsString| {
        args.push(format!("--{name}").into());
        args.push(value);
    };
    if let Some(id) = &t.spiffe_id {
        id.parse::<oxid_pki::SpiffeId>()
            .map_err(|e| format!("spiffe_id {id:?}: {e}"))?;
        flag("spiffe-id", id.into());
    }
    let cert_mode = mode("cert_mode", t.cert_mode.as_deref(), 0o644)?;
    let key_mode = mode("key_mode", t.key_mode.as_deref(), 0o600)?;
    if key_mode & 0o007 != 0 {
        return Err(format!(
            "key_mode {key_mode:04o} lets every user read the private key"
        ));
    }
    flag("cert-mode", format!("{cert_mode:04o}").into());
    flag("key-mode", format!("{key_mode:04o}").into());
    let defaults = Names::default();
    let names = Names {
        svid: t.svid_file_name.unwrap_or(defaults.svid),
        key: t.key_file_name.unwrap_or(defaults.key),
        bundle: t.bundle_file_name.unwrap_or(defaults.bundle),
    };
    names.check()?;
    flag("svid-file-name", names.svid.into());
    flag("key-file-name", names.key.into());
    flag("bundle-file-name", names.bundle.into());
    if t.jwt_audiences.len() > MAX_AUDIENCES {
        return Err(format!("jwt_audiences: at most {MAX_AUDIENCES}"));
    }
    for audience in t.jwt_audiences {
        if audience.is_empty() || audience.chars().any(char::is_control) {
            return Err(format!("jwt_audiences: {audience:?} is not an audience"));
        }
        flag("jwt-audience", audience.into());
    }
    match (t.signal, t.pid_file, t.reload_command) {
        (Some(signal), Some(pid_file), None) => {
            super::parse_signal(&signal).map_err(|e| format!("signal: {e}"))?;
            flag("signal", signal.into());
            flag("pid-file", checked_path("pid_file", &pid_file)?.into());
        }
        (None, None, Some(command)) => {
            if command.trim().is_empty() {
                return Err("reload_command is empty".into());
            }
            flag("reload-command", command.into());
        }
        (None, None, None) => {}
        (Some(_), None, None) => return Err("signal needs pid_file (the process to signal)".into()),
        (None, Some(_), None) => return Err("pid_file needs signal".into()),
        (_, _, Some(_)) => {
            return Err("give either signal with pid_file, or reload_command, not both".into());
        }
    }
    Ok(FilesTable {
        user: t.user,
        uid,
        gid,
        dir,
        args,
    })
}

/// An absolute path with no `.` or `..` in it, as the writer compares
/// and the operator reads it.
fn checked_path(key: &str, path: &Path) -> Result<PathBuf, String> {
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain {
        return Err(format!(
            "{key} {}: give an absolute path without . or ..",
            path.display()
        ));
    }
    Ok(path.components().collect())
}

/// An octal mode given as text ("0640").
fn mode(key: &str, given: Option<&str>, default: u32) -> Result<u32, String> {
    let Some(text) = given else {
        return Ok(default);
    };
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777 && !text.is_empty())
        .ok_or_else(|| format!("{key} {text:?}: expected an octal file mode such as \"0640\""))
}

/// A uid, or a user name in `passwd`: the uid and, if known, the primary
/// gid.
fn user_ids(passwd: &str, user: &str) -> Result<(u32, Option<u32>), String> {
    let entry = |pick: &dyn Fn(&str, u32) -> bool| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let (uid, gid) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            pick(f.first()?, uid).then_some((uid, Some(gid)))
        })
    };
    match user.parse::<u32>() {
        Ok(uid) => Ok(entry(&|_, u| u == uid).unwrap_or((uid, None))),
        Err(_) => entry(&|name, _| name == user)
            .ok_or_else(|| format!("user {user:?}: no such user in /etc/passwd")),
    }
}

/// A gid, or a group name in `groups` (the text of `/etc/group`).
pub fn group_id(groups: &str, group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .ok_or_else(|| format!("group {group:?}: no such group in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:102::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nnginx:x:102:\nssl-cert:x:110:nginx\n";

    fn table(toml_text: &str) -> Result<FilesTable, String> {
        #[derive(Deserialize)]
        struct One {
            files: Vec<FilesFile>,
        }
        let one: One = toml::from_str(toml_text).map_err(|e| e.message().to_owned())?;
        let t = one.files.into_iter().next().ok_or("no table")?;
        resolve_one(t, PASSWD, GROUP)
    }

    fn args(t: &FilesTable) -> Vec<String> {
        t.argv(Path::new("/run/s.sock"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn a_table_becomes_the_writers_command_line() {
        let t = table(
            "[[files]]\nuser = \"nginx\"\ngroup = \"ssl-cert\"\ndir = \"/var/lib/oxid/nginx\"\n\
             key_mode = \"0640\"\nsvid_file_name = \"tls.crt\"\njwt_audiences = [\"db\"]\n\
             signal = \"HUP\"\npid_file = \"/run/nginx.pid\"\n",
        )
        .unwrap();
        assert_eq!((t.uid, t.gid), (101, 110));
        assert_eq!(
            args(&t).join(" "),
            "api watch --write /var/lib/oxid/nginx --socket-path /run/s.sock --group 110 \
             --cert-mode 0644 --key-mode 0640 --svid-file-name tls.crt --key-file-name \
             svid.key --bundle-file-name bundle.pem --jwt-audience db --signal HUP \
             --pid-file /run/nginx.pid"
        );
        // The primary group by default; numeric ids need no entry.
        let t = table("[[files]]\nuser = \"nginx\"\ndir = \"/d\"\n").unwrap();
        assert_eq!((t.uid, t.gid), (101, 102));
        let t = table("[[files]]\nuser = \"4000\"\ngroup = \"4001\"\ndir = \"/d\"\n").unwrap();
        assert_eq!((t.uid, t.gid), (4000, 4001));
        let t = table(
            "[[files]]\nuser = \"0\"\ndir = \"/d\"\nreload_command = \"x\"\nfederated_bundles = false\n",
        )
        .unwrap();
        assert_eq!((t.uid, t.gid), (0, 0));
        assert!(args(&t).ends_with(&["--reload-command".into(), "x".into()]));
        assert!(args(&t).contains(&"--no-federated-bundles".into()));
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        for (body, says) in [
            ("dir = \"/d\"\n", "missing field `user`"),
            ("user = \"nginx\"\n", "missing field `dir`"),
            (
                "user = \"nginx\"\ndir = \"/d\"\ncommand = [\"x\"]\n",
                "unknown field `command`",
            ),
            ("user = \"nobody-here\"\ndir = \"/d\"\n", "no such user"),
            ("user = \"4000\"\ndir = \"/d\"\n", "give group"),
            (
                "user = \"nginx\"\ngroup = \"wheel\"\ndir = \"/d\"\n",
                "no such group",
            ),
            ("user = \"nginx\"\ndir = \"d\"\n", "absolute path"),
            ("user = \"nginx\"\ndir = \"/a/../etc\"\n", "without . or .."),
            (
                "user = \"nginx\"\ndir = \"/d\"\ncert_mode = \"644x\"\n",
                "cert_mode \"644x\"",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\ncert_mode = \"\"\n",
                "cert_mode \"\"",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\ncert_mode = \"1777\"\n",
                "octal file mode",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nkey_mode = \"0644\"\n",
                "every user read",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\ncert_mode = 420\n",
                "invalid type",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nkey_file_name = \"../k\"\n",
                "plain file name",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nkey_file_name = \"svid.pem\"\n",
                "must differ",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nspiffe_id = \"http://x\"\n",
                "spiffe_id",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\njwt_audiences = [\"\"]\n",
                "not an audience",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nsignal = \"HUP\"\n",
                "needs pid_file",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\npid_file = \"/p\"\n",
                "needs signal",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nsignal = \"KILL\"\npid_file = \"/p\"\n",
                "signal \"KILL\"",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nsignal = \"HUP\"\npid_file = \"p\"\n",
                "pid_file p",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nsignal = \"HUP\"\npid_file = \"/p\"\n\
                 reload_command = \"x\"\n",
                "not both",
            ),
            (
                "user = \"nginx\"\ndir = \"/d\"\nreload_command = \" \"\n",
                "empty",
            ),
        ] {
            let e = table(&format!("[[files]]\n{body}")).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
        let many = format!(
            "[[files]]\nuser = \"nginx\"\ndir = \"/d\"\njwt_audiences = [{}]\n",
            vec!["\"a\""; 33].join(",")
        );
        assert!(table(&many).unwrap_err().contains("at most 32"));
    }

    #[test]
    fn two_tables_may_not_share_a_directory() {
        let t = |dir: &str| FilesFile {
            user: "0".into(),
            group: Some("0".into()),
            dir: dir.into(),
            spiffe_id: None,
            cert_mode: None,
            key_mode: None,
            svid_file_name: None,
            key_file_name: None,
            bundle_file_name: None,
            jwt_audiences: Vec::new(),
            federated_bundles: None,
            signal: None,
            pid_file: None,
            reload_command: None,
        };
        assert_eq!(resolve(&[t("/a"), t("/b")]).unwrap().len(), 2);
        let e = resolve(&[t("/a"), t("/b"), t("/a/")]).unwrap_err();
        assert!(e.contains("#3: dir /a is also table #1's"), "{e}");
    }

    #[test]
    fn group_names_and_numbers() {
        assert_eq!(group_id(GROUP, "ssl-cert"), Ok(110));
        assert_eq!(group_id(GROUP, "77"), Ok(77));
        assert!(group_id(GROUP, "nginx:x").is_err());
        assert!(group_id("", "nginx").is_err());
    }
}
