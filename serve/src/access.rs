//! Who may call and what they may touch: bearer tokens checked on every call, and the storage
//! prefixes a request's URLs must lie under (nothing else on the server's disks or in its
//! buckets can be read or written through it).

use std::path::{Component, Path, PathBuf};

use subtle::ConstantTimeEq;
use tessera_data::Location;
use tonic::{Request, Status};

use crate::ServeError;

/// The environment variable with comma-separated tokens (besides or instead of a file).
pub const TOKENS_ENV: &str = "TESSERA_SERVE_TOKENS";

/// Accepted bearer tokens. Empty means every call is refused, unless the server was started
/// unauthenticated on purpose ([`Tokens::none`]).
#[derive(Clone)]
pub struct Tokens {
    accepted: Vec<Vec<u8>>,
    required: bool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Tokens")
            .field("count", &self.accepted.len())
            .field("required", &self.required)
            .finish()
    }
}

impl Tokens {
    /// Tokens from `text`: one per line or comma-separated, blank lines and `#` comments ignored.
    pub fn parse(text: &str) -> Tokens {
        let accepted = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default())
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.as_bytes().to_vec())
            .collect();
        Tokens {
            accepted,
            required: true,
        }
    }

    /// Tokens from a file and/or [`TOKENS_ENV`]; none found is an error (a server that accepts
    /// everyone must say so with [`Tokens::none`]).
    pub fn load(file: Option<&Path>, env: Option<&str>) -> Result<Tokens, ServeError> {
        let mut tokens = Tokens {
            accepted: Vec::new(),
            required: true,
        };
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| ServeError::Config(format!("tokens file {}: {e}", file.display())))?;
            tokens.accepted.extend(Tokens::parse(&text).accepted);
        }
        if let Some(env) = env {
            tokens.accepted.extend(Tokens::parse(env).accepted);
        }
        if tokens.accepted.is_empty() {
            return Err(ServeError::Config(format!(
                "no bearer tokens: give --tokens-file or set {TOKENS_ENV} (or start with --allow-unauthenticated on a trusted network)"
            )));
        }
        Ok(tokens)
    }

    /// Every call accepted (a trusted network, tests).
    pub fn none() -> Tokens {
        Tokens {
            accepted: Vec::new(),
            required: false,
        }
    }

    /// Checks a request's `authorization: Bearer <token>` header.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        if !self.required {
            return Ok(request);
        }
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "missing the authorization header (expected \"Bearer <token>\")",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "malformed authorization header (expected \"Bearer <token>\")",
                )
            })?;
        // Compared with every accepted token in constant time: no early exit tells how close a
        // guess came.
        let matched = self
            .accepted
            .iter()
            .fold(subtle::Choice::from(0), |any, t| {
                any | t.as_slice().ct_eq(token.as_bytes())
            });
        if bool::from(matched) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// Storage prefixes requests may name: local directories (canonical, symlinks resolved) and
/// URL prefixes (scheme, bucket and leading path segments).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    local: Vec<PathBuf>,
    urls: Vec<(String, String, Vec<String>)>,
}

/// A URL's scheme, host and path segments (an s3://bucket/a/b URL: "s3", "bucket", [a, b]).
fn url_parts(location: &Location) -> Option<(String, String, Vec<String>)> {
    let (scheme, host, path) = match location {
        Location::Cloud(url) => (
            url.scheme().to_string(),
            url.host_str().unwrap_or_default().to_string(),
            url.path().to_string(),
        ),
        Location::Memory { name, prefix } => ("memory".to_string(), name.clone(), prefix.clone()),
        Location::Local(_) => return None,
    };
    Some((
        scheme,
        host,
        path.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Entries a store may hold for `links_inside` to walk (a query store has thousands; a
/// deeper or larger tree is refused rather than walked without end).
const MAX_WALKED: usize = 1_000_000;

impl AllowList {
    /// Every symbolic link under `root` (a store or model folder) resolves under an allowed
    /// prefix: every file a job opens is then allowed, not only the folder it names.
    fn links_inside(&self, root: &Path) -> Result<(), String> {
        let mut pending = vec![root.to_path_buf()];
        let mut walked = 0usize;
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // a file, or unreadable: the job's own open reports it
            };
            for entry in entries.flatten() {
                walked += 1;
                if walked > MAX_WALKED {
                    return Err(format!("holds more than {MAX_WALKED} files"));
                }
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_symlink() {
                    let target = path.canonicalize().map_err(|e| {
                        format!("the link {} does not resolve: {e}", path.display())
                    })?;
                    if !self.local.iter().any(|p| target.starts_with(p)) {
                        return Err(format!(
                            "the link {} leads outside the allowed prefixes",
                            path.display()
                        ));
                    }
                } else if kind.is_dir() {
                    pending.push(path);
                }
            }
        }
        Ok(())
    }

    /// Parses `--allow-prefix` values; local ones must exist.
    pub fn new(prefixes: &[String]) -> Result<AllowList, ServeError> {
        let mut list = AllowList::default();
        for text in prefixes {
            let location = Location::parse(text)
                .map_err(|e| ServeError::Config(format!("--allow-prefix {text}: {e}")))?;
            match url_parts(&location) {
                Some(parts) => list.urls.push(parts),
                None => {
                    let Location::Local(path) = location else {
                        continue;
                    };
                    let canonical = path
                        .canonicalize()
                        .map_err(|e| ServeError::Config(format!("--allow-prefix {text}: {e}")))?;
                    list.local.push(canonical);
                }
            }
        }
        Ok(list)
    }

    /// Adds a local directory the server itself owns (its scratch space).
    pub fn with_local(mut self, dir: &Path) -> Result<AllowList, ServeError> {
        self.local.push(
            dir.canonicalize()
                .map_err(|e| ServeError::Config(format!("{}: {e}", dir.display())))?,
        );
        Ok(self)
    }

    /// Whether `field`'s `text` lies under an allowed prefix; the error names the field, the
    /// location and why.
    pub fn check(&self, field: &str, text: &str) -> Result<(), Status> {
        let denied = |why: &str| Status::permission_denied(format!("{field} {text:?}: {why}"));
        let location =
            Location::parse(text).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
        if text
            .split(['/', '\\'])
            .any(|s| s == ".." || s.eq_ignore_ascii_case("%2e%2e"))
        {
            return Err(denied("'..' is not allowed in storage locations"));
        }
        match (&location, url_parts(&location)) {
            (_, Some((scheme, host, segments))) => {
                let under = self.urls.iter().any(|(s, h, prefix)| {
                    *s == scheme
                        && *h == host
                        && segments.len() >= prefix.len()
                        && segments[..prefix.len()] == prefix[..]
                });
                if under {
                    Ok(())
                } else {
                    Err(denied("not under an allowed storage prefix"))
                }
            }
            (Location::Local(path), None) => {
                let absolute = std::path::absolute(path).map_err(|e| denied(&e.to_string()))?;
                if absolute
                    .components()
                    .any(|c| matches!(c, Component::ParentDir))
                {
                    return Err(denied("'..' is not allowed in storage locations"));
                }
                // Symlinks resolved: a link inside an allowed folder cannot lead out of it.
                let real = absolute.canonicalize().unwrap_or(absolute);
                if !self.local.iter().any(|p| real.starts_with(p)) {
                    return Err(denied("not under an allowed storage prefix"));
                }
                // Nor a link anywhere below it (a chunk file linked to a file outside).
                self.links_inside(&real).map_err(|why| denied(&why))
            }
            _ => Err(denied("not under an allowed storage prefix")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose
    use super::*;

    fn bearer(token: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }

    #[test]
    fn only_listed_tokens_pass() {
        let tokens = Tokens::parse("# lab tokens\nalpha\n\nbeta, gamma\n");
        for t in ["alpha", "beta", "gamma"] {
            assert!(tokens.check(bearer(t)).is_ok(), "{t}");
        }
        for (request, why) in [
            (bearer("alph"), "invalid bearer token"),
            (bearer("alphaa"), "invalid bearer token"),
            (bearer(""), "invalid bearer token"),
            (Request::new(()), "missing the authorization header"),
        ] {
            let e = tokens.check(request).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(e.message().contains(why), "{}", e.message());
        }
        let mut basic = Request::new(());
        basic
            .metadata_mut()
            .insert("authorization", "Basic YWxwaGE=".parse().unwrap());
        assert!(
            tokens
                .check(basic)
                .unwrap_err()
                .message()
                .contains("malformed")
        );
        assert!(Tokens::none().check(Request::new(())).is_ok());
        let e = Tokens::load(None, Some(" , ")).unwrap_err().to_string();
        assert!(
            e.contains("no bearer tokens") && e.contains(TOKENS_ENV),
            "{e}"
        );
        assert_eq!(
            format!("{:?}", Tokens::parse("secret")),
            "Tokens { count: 1, required: true }"
        );
    }

    #[test]
    fn locations_outside_the_prefixes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(allowed.join("q.zarr")).unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        let list = AllowList::new(&[
            allowed.display().to_string(),
            "s3://atlas/queries".into(),
            "memory://tests".into(),
        ])
        .unwrap();
        let ok = [
            allowed.join("q.zarr").display().to_string(),
            format!("file://{}", allowed.join("q.zarr").display()),
            "s3://atlas/queries/lab1/q.zarr".into(),
            "memory://tests/x".into(),
        ];
        for text in ok {
            assert!(list.check("data_url", &text).is_ok(), "{text}");
        }
        let refused = [
            dir.path().join("secret").display().to_string(),
            format!("{}/../secret", allowed.display()),
            "/etc/passwd".into(),
            "s3://atlas/queriesX/q.zarr".into(),
            "s3://atlas/other/q.zarr".into(),
            "s3://other-bucket/queries/q.zarr".into(),
            "gs://atlas/queries/q.zarr".into(),
            "s3://atlas/queries/%2e%2e/secret".into(),
            "memory://other/x".into(),
        ];
        for text in refused {
            let e = list.check("data_url", &text).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{text}");
            assert!(
                e.message().starts_with("data_url") && e.message().contains(&text),
                "{}",
                e.message()
            );
        }
        // A link inside the allowed folder that leads out of it.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), allowed.join("escape")).unwrap();
            assert!(
                list.check("data_url", &allowed.join("escape").display().to_string())
                    .is_err()
            );
            // A chunk of an allowed store linked to a file outside: refused, naming the link;
            // a link that stays inside is fine.
            let store = allowed.join("linked.zarr");
            std::fs::create_dir_all(store.join("X/data")).unwrap();
            std::fs::write(dir.path().join("secret/key"), "x").unwrap();
            std::fs::write(allowed.join("inside"), "x").unwrap();
            std::os::unix::fs::symlink(allowed.join("inside"), store.join("X/ok")).unwrap();
            let text = store.display().to_string();
            assert!(list.check("data_url", &text).is_ok());
            std::os::unix::fs::symlink(dir.path().join("secret/key"), store.join("X/data/0"))
                .unwrap();
            let e = list.check("data_url", &text).unwrap_err();
            assert!(
                e.message().contains("X/data/0") && e.message().contains("leads outside"),
                "{}",
                e.message()
            );
        }
        assert_eq!(
            list.check("data_url", "ftp://x/y").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(
            AllowList::new(&["/no/such/prefix".into()])
                .unwrap_err()
                .to_string()
                .contains("/no/such/prefix")
        );
    }
}
