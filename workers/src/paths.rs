//! The layout of the server's data dir, in one place: where jobs work, where their logs and
//! artifacts go, where pipeline specs are written for workers. Everything that names a path
//! under the data dir (the executors, the janitor, the server's log and artifact routes) asks
//! a [`DataDir`], so changing the layout is a change to this file alone.
//!
//! ```text
//! data_dir/
//!   jobs/{job_id}/stdout.log, stderr.log, ...   one dir per job that put something there
//!   jobs/pipelines/{name}-{hash}.json           the pipeline specs workers read
//!   artifacts/{sha256hex}.png                   content-addressed outputs
//! ```
//!
//! The artifacts may live elsewhere instead ([`DataDir::with_artifacts`]: `artifacts_dir`), a
//! directory several servers share, so that any of them serves what any of them made.

use std::path::{Path, PathBuf};

const JOBS_DIR: &str = "jobs";
/// Under the jobs dir: not a job id, so the janitor leaves it alone.
const PIPELINES_DIR: &str = "pipelines";
const ARTIFACTS_DIR: &str = "artifacts";
/// An artifact's file name is its content's SHA-256, in hex, then this.
const ARTIFACT_SUFFIX: &str = ".png";
/// How artifacts are served and referenced (`/artifacts/{sha256hex}.png`).
const ARTIFACT_URI_PREFIX: &str = "/artifacts/";
const SHA256_HEX_LEN: usize = 64;
const STDOUT_LOG: &str = "stdout.log";
const STDERR_LOG: &str = "stderr.log";

/// The server's data dir, as the workers lay it out (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
    /// `artifacts_dir`, when set: used instead of `root/artifacts`.
    artifacts: Option<PathBuf>,
}

impl DataDir {
    /// The layout under `root`, taken as given: workers run in their job dir, so a server
    /// that hands these paths to workers makes `root` absolute first ([`DataDir::absolute`]).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into(), artifacts: None }
    }

    /// The same layout with the artifacts in `dir` (absolute) instead of under the root.
    pub fn with_artifacts(self, dir: Option<PathBuf>) -> DataDir {
        DataDir { artifacts: dir, ..self }
    }

    /// The layout under `root` made absolute (against the current dir), so that the paths
    /// handed to workers do not depend on the server's cwd.
    pub fn absolute(root: &Path) -> std::io::Result<DataDir> {
        Ok(DataDir { root: std::path::absolute(root)?, artifacts: None })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where every job's working dir lives (and the pipeline specs).
    pub fn jobs(&self) -> PathBuf {
        self.root.join(JOBS_DIR)
    }

    /// A job's working dir; made only once something goes in it.
    pub fn job(&self, job_id: u64) -> PathBuf {
        self.jobs().join(job_id.to_string())
    }

    /// The job whose working dir this entry of [`DataDir::jobs`] is, if it is one.
    pub fn job_id_of(entry_name: &std::ffi::OsStr) -> Option<u64> {
        entry_name.to_str().and_then(|n| n.parse::<u64>().ok())
    }

    /// Paths of a job's captured stdout and stderr. A missing file reads as empty: it is
    /// created at the first byte.
    pub fn job_logs(&self, job_id: u64) -> (PathBuf, PathBuf) {
        let dir = self.job(job_id);
        (dir.join(STDOUT_LOG), dir.join(STDERR_LOG))
    }

    /// The content-addressed artifacts, `{sha256hex}.png`.
    pub fn artifacts(&self) -> PathBuf {
        self.artifacts.clone().unwrap_or_else(|| self.root.join(ARTIFACTS_DIR))
    }

    /// Whether the artifacts live outside the data dir (`artifacts_dir`).
    pub fn artifacts_elsewhere(&self) -> bool {
        self.artifacts.is_some()
    }

    /// The artifact this entry of [`DataDir::artifacts`] is (its hash), if it is one: a
    /// writer's temporary file or anything else there is not.
    pub fn artifact_of(entry_name: &std::ffi::OsStr) -> Option<&str> {
        let hash = entry_name.to_str()?.strip_suffix(ARTIFACT_SUFFIX)?;
        is_sha256_hex(hash).then_some(hash)
    }

    /// Where the pipeline specs workers read are written.
    pub fn pipeline_specs(&self) -> PathBuf {
        self.jobs().join(PIPELINES_DIR)
    }

    /// The spec of pipeline `name` whose content hashes to `hash`: named by content, so a
    /// changed spec never reuses a stale file.
    pub fn pipeline_spec(&self, name: &str, hash: &str) -> PathBuf {
        self.pipeline_specs().join(format!("{name}-{hash}.json"))
    }

    /// Where a spec is written before it is renamed into place (`job_id` keeps two writers
    /// apart), so a worker never reads half a file.
    pub fn pipeline_spec_tmp(&self, name: &str, hash: &str, job_id: u64) -> PathBuf {
        self.pipeline_specs().join(format!(".{name}-{hash}.{job_id}.tmp"))
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == SHA256_HEX_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hashes of every artifact `text` refers to (`/artifacts/{sha256hex}.png`, anywhere in
/// it: an artifact report, a result, a context).
pub fn artifact_refs(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices(ARTIFACT_URI_PREFIX).filter_map(|(i, _)| {
        let rest = &text[i + ARTIFACT_URI_PREFIX.len()..];
        let hash = rest.get(..SHA256_HEX_LEN)?;
        (is_sha256_hex(hash) && rest[SHA256_HEX_LEN..].starts_with(ARTIFACT_SUFFIX)).then_some(hash)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout is an on-disk format: servers of other versions and operators read it.
    #[test]
    fn the_layout_is_stable() {
        let d = DataDir::new("/data");
        assert_eq!(d.jobs(), Path::new("/data/jobs"));
        assert_eq!(d.job(7), Path::new("/data/jobs/7"));
        assert_eq!(
            d.job_logs(7),
            (PathBuf::from("/data/jobs/7/stdout.log"), PathBuf::from("/data/jobs/7/stderr.log"))
        );
        assert_eq!(d.artifacts(), Path::new("/data/artifacts"));
        assert_eq!(d.pipeline_spec("p", "ab12"), Path::new("/data/jobs/pipelines/p-ab12.json"));
        assert_eq!(d.pipeline_spec_tmp("p", "ab12", 3), Path::new("/data/jobs/pipelines/.p-ab12.3.tmp"));
        assert_eq!(DataDir::job_id_of("7".as_ref()), Some(7));
        assert_eq!(DataDir::job_id_of(PIPELINES_DIR.as_ref()), None);
    }

    #[test]
    fn artifacts_are_named_and_referenced_by_their_hash() {
        let h = "ab".repeat(32);
        assert_eq!(DataDir::artifact_of(format!("{h}.png").as_ref()), Some(h.as_str()));
        assert_eq!(DataDir::artifact_of(format!(".{h}.png.tmp").as_ref()), None);
        assert_eq!(DataDir::artifact_of("AB.png".as_ref()), None);
        let text =
            format!(r#"{{"uri":"/artifacts/{h}.png","x":"/artifacts/{h}.gif","y":"/artifacts/abc.png"}}"#);
        assert_eq!(artifact_refs(&text).collect::<Vec<_>>(), vec![h.as_str()]);
    }
}
