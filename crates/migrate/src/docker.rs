//! Docker mode of the migration commands: a container of one Docker daemon
//! (run with `--runtime=migrun`) moves to another daemon.
//!
//! The engine moves memory, the writable layer (overlay2's upper directory,
//! synced in rounds like a root filesystem) and CRIU's images as for any
//! container. Around it, this module talks to both daemons through their
//! Engine API (bollard):
//! - the image: the target says which layers it lacks, by diff id (a layer
//!   is present when its chain id is one of the target's images' layers);
//!   the source sends `docker save` of the image without the layer tarballs
//!   the target has, and the target loads it (`POST /images/load` skips a
//!   layer whose chain id it has), so the image id is the same on both;
//! - the container: created on the target with the source's name, config
//!   and host config, then started from a checkpoint (the CRIU images put in
//!   its checkpoint directory), Docker's own restore path;
//! - on success the source container is removed from the source daemon.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bollard::Docker;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{MigrateError, Result};

/// The Engine API version spoken (Docker 20.10 and newer).
const API: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Marker in `LayersWanted`: the target lacks the image itself (its config).
pub const WANT_IMAGE: &str = "image";
/// File in a checkpoint directory that makes `migrun restore` leave the
/// restored processes stopped (the two-phase hand-over of a migration).
pub use migrun_runtime::checkpoint::{LEAVE_STOPPED_MARKER, TCP_CLOSE_MARKER};

fn api_err(what: &str, e: bollard::errors::Error) -> MigrateError {
    MigrateError::Docker(format!("{what}: {e}"))
}

/// One Docker daemon.
pub struct Daemon {
    docker: Docker,
    socket: PathBuf,
}

impl Daemon {
    /// Connects to the daemon at `host` (`unix:///PATH` or a socket path).
    pub fn connect(host: &str) -> Result<Self> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if host.contains("://") && !host.starts_with("unix://") {
            return Err(MigrateError::Docker(format!(
                "--docker-host {host}: only unix:// sockets are supported"
            )));
        }
        let docker = Docker::connect_with_unix(path, 120, &API)
            .map_err(|e| api_err(&format!("connect to {host}"), e))?;
        Ok(Self {
            docker,
            socket: PathBuf::from(path),
        })
    }

    /// `docker inspect` of a container, by name or id, as JSON.
    pub async fn container(&self, name: &str) -> Result<Value> {
        let c = self
            .docker
            .inspect_container(name, None)
            .await
            .map_err(|e| api_err(&format!("container {name}"), e))?;
        serde_json::to_value(c).map_err(|e| MigrateError::Docker(e.to_string()))
    }

    /// Refuses a daemon whose storage driver is not overlay2.
    pub async fn check_driver(&self) -> Result<()> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| api_err("docker info", e))?;
        match info.driver.as_deref() {
            Some("overlay2") => Ok(()),
            Some("aufs") => Err(MigrateError::Docker(
                "this Docker daemon stores containers with aufs, which is not in mainline Linux kernels: only overlay2 is supported".into(),
            )),
            other => Err(MigrateError::Docker(format!(
                "this Docker daemon's storage driver is {}: only overlay2 is supported",
                other.unwrap_or("unknown")
            ))),
        }
    }

    /// The daemon's data root (`DockerRootDir`).
    pub async fn root_dir(&self) -> Result<PathBuf> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| api_err("docker info", e))?;
        info.docker_root_dir
            .map(PathBuf::from)
            .ok_or_else(|| MigrateError::Docker("docker info has no DockerRootDir".into()))
    }

    /// The diff ids of image `image`, or `None` if the daemon lacks it.
    pub async fn image_diff_ids(&self, image: &str) -> Result<Option<Vec<String>>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(i.root_fs.and_then(|r| r.layers).unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(api_err(&format!("image {image}"), e)),
        }
    }

    /// Chain ids of every layer of every image the daemon has.
    pub async fn chain_ids(&self) -> Result<HashSet<String>> {
        let images = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(|e| api_err("list images", e))?;
        let mut out = HashSet::new();
        for i in images {
            if let Some(diff) = self.image_diff_ids(&i.id).await? {
                out.extend(chain_ids_of(&diff));
            }
        }
        Ok(out)
    }

    /// `docker save` of `image` into `dest`.
    pub async fn save(&self, image: &str, dest: &Path) -> Result<()> {
        use futures_util::StreamExt;
        let mut f = fs::File::create(dest)
            .map_err(|e| MigrateError::Source(format!("create {}: {e}", dest.display())))?;
        let mut stream = self.docker.export_image(image);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| api_err(&format!("save image {image}"), e))?;
            f.write_all(&chunk)
                .map_err(|e| MigrateError::Source(format!("write {}: {e}", dest.display())))?;
        }
        Ok(())
    }

    /// `docker load` of the tarball `tar`.
    pub async fn load(&self, tar: &Path) -> Result<()> {
        use futures_util::StreamExt;
        let data = fs::read(tar)
            .map_err(|e| MigrateError::Target(format!("read {}: {e}", tar.display())))?;
        let mut stream = self.docker.import_image(
            bollard::query_parameters::ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            bollard::body_full(data.into()),
            None,
        );
        while let Some(info) = stream.next().await {
            let info = info.map_err(|e| api_err("load image", e))?;
            if let Some(e) = info.error_detail.and_then(|d| d.message) {
                return Err(MigrateError::Docker(format!("load image: {e}")));
            }
        }
        Ok(())
    }

    /// Makes `reference` (e.g. `busybox:local`, as the container was created
    /// with) name image `image_id` here, unless it names another image;
    /// returns what to create the container from: the reference, or the id.
    pub async fn reference_for(&self, image_id: &str, reference: &str) -> Result<String> {
        if reference.is_empty() || reference.starts_with("sha256:") {
            return Ok(image_id.to_string());
        }
        if let Ok(i) = self.docker.inspect_image(reference).await {
            return Ok(if i.id.as_deref() == Some(image_id) {
                reference.to_string()
            } else {
                image_id.to_string()
            });
        }
        let (repo, tag) = match reference.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (reference.to_string(), "latest".to_string()),
        };
        self.docker
            .tag_image(
                image_id,
                Some(bollard::query_parameters::TagImageOptions {
                    repo: Some(repo),
                    tag: Some(tag),
                }),
            )
            .await
            .map_err(|e| api_err(&format!("tag image {image_id} as {reference}"), e))?;
        Ok(reference.to_string())
    }

    /// Creates (not starts) a container like the one `inspect` describes,
    /// with its name, image, config and host config; returns its id.
    pub async fn create_like(&self, inspect: &Value) -> Result<String> {
        let name = inspect["Name"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let mut body = inspect["Config"].clone();
        if !body.is_object() {
            return Err(MigrateError::Protocol("container without Config".into()));
        }
        body["HostConfig"] = inspect["HostConfig"].clone();
        let body: bollard::models::ContainerCreateBody = serde_json::from_value(body)
            .map_err(|e| MigrateError::Protocol(format!("container config: {e}")))?;
        let created = self
            .docker
            .create_container(
                Some(bollard::query_parameters::CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| api_err(&format!("create container {name}"), e))?;
        Ok(created.id)
    }

    /// Starts container `id` from its checkpoint `checkpoint` (Docker's
    /// restore path). bollard has no checkpoint parameter: this one request
    /// is made by hand on the daemon's socket.
    pub async fn start_from_checkpoint(&self, id: &str, checkpoint: &str) -> Result<()> {
        let mut s = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| MigrateError::Docker(format!("connect {}: {e}", self.socket.display())))?;
        let req = format!(
            "POST /v1.41/containers/{id}/start?checkpoint={checkpoint} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| MigrateError::Docker(format!("start {id}: {e}")))?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .await
            .map_err(|e| MigrateError::Docker(format!("start {id}: {e}")))?;
        let text = String::from_utf8_lossy(&resp);
        let status = text.split(' ').nth(1).unwrap_or("");
        if status == "204" || status == "304" {
            return Ok(());
        }
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        let message = body
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| body.to_string());
        Err(MigrateError::Docker(format!(
            "start {id} from its checkpoint: {message}"
        )))
    }

    /// Removes container `id`, killing it if it runs.
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.docker
            .remove_container(
                id,
                Some(bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| api_err(&format!("remove container {id}"), e))
    }

    /// Removes image `id` if nothing uses it.
    pub async fn remove_image(&self, id: &str) -> Result<()> {
        self.docker
            .remove_image(
                id,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .map(|_| ())
            .map_err(|e| api_err(&format!("remove image {id}"), e))
    }
}

/// The chain ids of a stack of diff ids (lowest first), as the OCI image
/// spec defines them.
pub fn chain_ids_of(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let h = Sha256::digest(format!("{prev} {d}").as_bytes());
                format!(
                    "sha256:{}",
                    h.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            }
        };
        out.push(next);
    }
    out
}

/// The diff ids of `diff_ids` whose layer the target lacks, given its
/// chain ids: a layer is present when its chain id is.
pub fn missing_layers(diff_ids: &[String], have: &HashSet<String>) -> Vec<String> {
    chain_ids_of(diff_ids)
        .into_iter()
        .zip(diff_ids)
        .filter(|(chain, _)| !have.contains(chain))
        .map(|(_, d)| d.clone())
        .collect()
}

/// Copies the `docker save` tarball `src` to `dst` without the layer
/// tarballs of the layers not in `wanted` (diff ids); returns the bytes of
/// layer tarballs kept. `docker load` does not read the tarball of a layer
/// it has.
pub fn filter_save(src: &Path, dst: &Path, diff_ids: &[String], wanted: &[String]) -> Result<u64> {
    let err = |e: std::io::Error| MigrateError::Source(format!("image tarball: {e}"));
    // manifest.json: the layer tarballs, in diff id order.
    let mut manifest = None;
    let mut ar = tar::Archive::new(fs::File::open(src).map_err(err)?);
    for entry in ar.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        if entry.path().map_err(err)?.as_os_str() == "manifest.json" {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(err)?;
            manifest = Some(text);
            break;
        }
    }
    let manifest: Value = serde_json::from_str(&manifest.unwrap_or_default())
        .map_err(|e| MigrateError::Source(format!("image manifest.json: {e}")))?;
    let layers: Vec<String> = manifest[0]["Layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if layers.len() != diff_ids.len() {
        return Err(MigrateError::Source(format!(
            "image tarball has {} layers, the image {}",
            layers.len(),
            diff_ids.len()
        )));
    }
    let skip: HashSet<&str> = layers
        .iter()
        .zip(diff_ids)
        .filter(|(_, d)| !wanted.contains(d))
        .map(|(l, _)| l.as_str())
        .collect();
    let mut out = tar::Builder::new(fs::File::create(dst).map_err(err)?);
    let mut kept = 0;
    let mut ar = tar::Archive::new(fs::File::open(src).map_err(err)?);
    for entry in ar.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = entry.path().map_err(err)?.to_string_lossy().into_owned();
        if skip.contains(path.as_str()) {
            continue;
        }
        if layers.contains(&path) {
            kept += entry.header().size().map_err(err)?;
        }
        let header = entry.header().clone();
        out.append(&header, &mut entry).map_err(err)?;
    }
    out.finish().map_err(err)?;
    Ok(kept)
}

/// Lets the daemon's container `cid` run: it was started from a checkpoint
/// that its migrun runtime restored stopped (`LEAVE_STOPPED_MARKER`), under
/// that runtime's state root.
pub async fn continue_restored(daemon: &Daemon, cid: &str) -> Result<()> {
    let running = daemon.container(cid).await?;
    let pid = running["State"]["Pid"].as_i64().unwrap_or(0);
    let runtime = migrun_runtime::StateRoot::open(&runtime_root(pid)?, false)?;
    migrun_runtime::checkpoint::continue_container(&runtime, cid)?;
    Ok(())
}

/// The migrun state root of a Docker container whose init is `pid`: the
/// runc v2 shim (its parent) runs with `-namespace NS -address
/// EXEC_ROOT/containerd/containerd.sock`, and passes migrun `--root
/// EXEC_ROOT/runtime-runc/NS`.
pub fn runtime_root(pid: i64) -> Result<PathBuf> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| MigrateError::Docker(format!("container process {pid}: {e}")))?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .map(str::trim)
        .unwrap_or("0");
    let cmdline = fs::read(format!("/proc/{ppid}/cmdline"))
        .map_err(|e| MigrateError::Docker(format!("shim of process {pid}: {e}")))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag || a == &format!("-{flag}"))
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(ns), Some(address)) = (value("-namespace"), value("-address")) else {
        return Err(MigrateError::Docker(format!(
            "process {pid}'s parent is not a containerd runc shim"
        )));
    };
    let exec_root = Path::new(&address)
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| MigrateError::Docker(format!("shim address {address}")))?;
    Ok(exec_root.join("runtime-runc").join(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d = vec!["sha256:aaa".to_string(), "sha256:bbb".to_string()];
        let c = chain_ids_of(&d);
        assert_eq!(c[0], "sha256:aaa");
        let want = Sha256::digest(b"sha256:aaa sha256:bbb");
        assert_eq!(
            c[1],
            format!(
                "sha256:{}",
                want.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        );
        let have: HashSet<String> = [c[0].clone()].into_iter().collect();
        assert_eq!(missing_layers(&d, &have), vec!["sha256:bbb".to_string()]);
        assert!(missing_layers(&d, &c.into_iter().collect()).is_empty());
    }

    #[test]
    fn save_tarball_loses_only_the_unwanted_layers() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("save.tar");
        let mut b = tar::Builder::new(fs::File::create(&src).expect("create"));
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).expect("append");
        };
        add("l1/layer.tar", &[1u8; 1024]);
        add("l2/layer.tar", &[2u8; 2048]);
        add("cfg.json", b"{}");
        add(
            "manifest.json",
            br#"[{"Config":"cfg.json","RepoTags":null,"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        );
        b.finish().expect("finish");
        drop(b);
        let diff = vec!["sha256:one".to_string(), "sha256:two".to_string()];
        let dst = dir.path().join("out.tar");
        let kept = filter_save(&src, &dst, &diff, &["sha256:two".to_string()]).expect("filter");
        assert_eq!(kept, 2048);
        let mut names = Vec::new();
        for e in tar::Archive::new(fs::File::open(&dst).expect("open"))
            .entries()
            .expect("entries")
        {
            names.push(
                e.expect("e")
                    .path()
                    .expect("p")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        assert_eq!(names, vec!["l2/layer.tar", "cfg.json", "manifest.json"]);
        // A tarball that does not match the image is refused.
        assert!(filter_save(&src, &dst, &diff[..1], &[]).is_err());
    }
}
