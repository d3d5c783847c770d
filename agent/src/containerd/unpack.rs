//! Getting an image's layers into the snapshotter, so containers can be made from it. containerd 1.6 offers
//! no service that does it for a client, and images reach containerd as imported tarballs, perhaps never
//! unpacked or unpacked for another snapshotter; so the agent reads the manifest and config itself and
//! unpacks the layers the way containerd's Go client does. (Importing the tarballs is [`crate::image`].)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, GetImageRequest,
    Info as ContentInfo, ReadContentRequest, UpdateRequest as UpdateContentRequest,
};
use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::Code;

use super::{hex, now_ms, Containerd, Error, Result};

/// Manifests and image configs are small; refuse anything absurd rather than buffer it.
const MAX_METADATA_BLOB: usize = 8 << 20;
/// Leases we create expire on their own after this long, in case the agent dies holding one.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

impl Containerd {
    /// Checks that `image` is in containerd and unpacked into this client's snapshotter (unpacking it if it
    /// was imported without unpacking, or for another snapshotter). An absent image is
    /// [`Error::ImageNotFound`], whose message says how to load one: there is no registry to pull from.
    pub async fn ensure_image(&self, image: &str) -> Result<()> {
        let resolved = self.resolve_image(image).await?;
        self.ensure_unpacked(&resolved).await
    }

    pub(super) async fn resolve_image(&self, image: &str) -> Result<ResolvedImage> {
        if image.is_empty() {
            return Err(Error::InvalidSpec("empty image name".into()));
        }
        let mut images = ImagesClient::new(self.inner.channel.clone());
        let got =
            self.call("images.get", image, images.get(self.request(GetImageRequest { name: image.into() }))).await;
        let target = match got {
            Ok(r) => r.image.and_then(|i| i.target),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        let Some(mut target) = target else {
            return Err(Error::ImageNotFound {
                image: image.to_string(),
                namespace: self.inner.namespace.clone(),
                socket: self.inner.socket.clone(),
            });
        };
        let bad = |reason: String| Error::BadImage { image: image.to_string(), reason };
        if is_index(&target.media_type) {
            let blob = self.read_blob(image, &target.digest).await?;
            let index: IndexJson = serde_json::from_slice(&blob).map_err(|e| bad(format!("bad index JSON: {e}")))?;
            let arch = host_arch();
            let chosen = index
                .manifests
                .iter()
                .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
                .or_else(|| if index.manifests.len() == 1 { index.manifests.first() } else { None })
                .ok_or_else(|| bad(format!("its index has no linux/{arch} manifest")))?;
            target = chosen.to_descriptor();
        }
        if !is_manifest(&target.media_type) {
            return Err(bad(format!(
                "unsupported media type {:?} (want an OCI or Docker manifest)",
                target.media_type
            )));
        }
        let blob = self.read_blob(image, &target.digest).await?;
        let manifest: ManifestJson =
            serde_json::from_slice(&blob).map_err(|e| bad(format!("bad manifest JSON: {e}")))?;
        let blob = self.read_blob(image, &manifest.config.digest).await?;
        let config: ImageConfigJson =
            serde_json::from_slice(&blob).map_err(|e| bad(format!("bad image config JSON: {e}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff ids in its config",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        if manifest.layers.is_empty() {
            return Err(bad("it has no layers".into()));
        }
        let chain_ids = chain_ids(&config.rootfs.diff_ids);
        Ok(ResolvedImage {
            name: image.to_string(),
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(BlobRef::to_descriptor).collect(),
            chain_ids,
            config: config.config.unwrap_or_default(),
        })
    }

    /// Reads a whole (small) blob from containerd's content store.
    async fn read_blob(&self, image: &str, digest: &str) -> Result<Vec<u8>> {
        let mut content = ContentClient::new(self.inner.channel.clone());
        let after = self.inner.options.rpc_timeout;
        let read = async {
            let mut stream = content
                .read(self.request(ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 }))
                .await?
                .into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.message().await? {
                data.extend_from_slice(&chunk.data);
                if data.len() > MAX_METADATA_BLOB {
                    return Err(tonic::Status::out_of_range(format!("blob larger than {MAX_METADATA_BLOB} bytes")));
                }
            }
            Ok(data)
        };
        match tokio::time::timeout(after, read).await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(status)) if status.code() == Code::NotFound => Err(Error::BadImage {
                image: image.to_string(),
                reason: format!("blob {digest} is missing from the content store (import the image again)"),
            }),
            Ok(Err(status)) => Err(Error::Rpc {
                op: "content.read",
                id: digest.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(Error::Timeout { op: "content.read", id: digest.to_string(), after }),
        }
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        let request = StatSnapshotRequest { snapshotter: self.inner.options.snapshotter.clone(), key: key.into() };
        match self.call("snapshots.stat", key, self.snapshots().stat(self.request(request))).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Unpacks the image's layers into the snapshotter if its top chain id is not there yet: for each layer,
    /// prepare an active snapshot on the previous one, apply the layer (containerd's diff service decompresses
    /// and untars it), commit it under its chain id. All under a lease, and finally the config blob is labelled
    /// with the top snapshot (`containerd.io/gc.ref.snapshot.<snapshotter>`), which is what keeps the
    /// snapshots from containerd's GC once the lease goes: exactly what containerd's own unpacker does.
    pub(super) async fn ensure_unpacked(&self, image: &ResolvedImage) -> Result<()> {
        let Some(top) = image.chain_ids.last() else {
            return Err(Error::BadImage { image: image.name.clone(), reason: "it has no layers".into() });
        };
        if self.snapshot_exists(top).await? {
            return Ok(());
        }
        let _guard = self.inner.unpack_lock.lock().await;
        if self.snapshot_exists(top).await? {
            return Ok(());
        }
        static UNPACKS: AtomicU64 = AtomicU64::new(0);
        let lease_id =
            format!("omega-unpack-{}-{}-{}", std::process::id(), UNPACKS.fetch_add(1, Ordering::Relaxed), now_ms());
        let lease = self.create_lease(&lease_id).await?;
        let result = self.unpack_layers(image, &lease).await;
        let dropped = self.delete_lease(&lease_id).await;
        result?;
        dropped
    }

    async fn unpack_layers(&self, image: &ResolvedImage, lease: &MetadataValue<Ascii>) -> Result<()> {
        let snapshotter = self.inner.options.snapshotter.clone();
        let mut parent = String::new();
        for (layer, chain) in image.layers.iter().zip(&image.chain_ids) {
            if !self.snapshot_exists(chain).await? {
                let key = format!("omega-extract-{}-{}", now_ms(), chain);
                let prepare = PrepareSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: HashMap::new(),
                };
                let mounts = self
                    .call("snapshots.prepare", &key, self.snapshots().prepare(self.leased(prepare, lease)))
                    .await?
                    .mounts;
                let applied = async {
                    let apply = ApplyRequest { diff: Some(layer.clone()), mounts, ..Default::default() };
                    let mut diff = DiffClient::new(self.inner.channel.clone());
                    self.call("diff.apply", &layer.digest, diff.apply(self.leased(apply, lease))).await?;
                    let commit = CommitSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    };
                    self.call("snapshots.commit", chain, self.snapshots().commit(self.leased(commit, lease))).await
                }
                .await;
                if let Err(e) = applied {
                    let remove = RemoveSnapshotRequest { snapshotter: snapshotter.clone(), key: key.clone() };
                    let _ = self.call("snapshots.remove", &key, self.snapshots().remove(self.request(remove))).await;
                    // Someone else (ctr, another agent) committed the same layer meanwhile: theirs is as good.
                    if !e.is_already_exists() {
                        return Err(e);
                    }
                }
            }
            parent = chain.clone();
        }
        let label = format!("containerd.io/gc.ref.snapshot.{snapshotter}");
        let update = UpdateContentRequest {
            info: Some(ContentInfo {
                digest: image.config_digest.clone(),
                labels: HashMap::from([(label.clone(), parent)]),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec![format!("labels.{label}")] }),
        };
        let mut content = ContentClient::new(self.inner.channel.clone());
        self.call("content.update", &image.config_digest, content.update(self.leased(update, lease))).await?;
        Ok(())
    }

    pub(super) async fn create_lease(&self, lease_id: &str) -> Result<MetadataValue<Ascii>> {
        let header = MetadataValue::try_from(lease_id)
            .map_err(|e| Error::InvalidSpec(format!("lease id {lease_id:?} cannot be a gRPC header: {e}")))?;
        let expires = SystemTime::now()
            .checked_add(LEASE_EXPIRY)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| omega::units::rfc3339(d.as_secs()))
            .unwrap_or_default();
        let request = CreateLeaseRequest {
            id: lease_id.to_string(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expires)]),
        };
        let mut leases = LeasesClient::new(self.inner.channel.clone());
        match self.call("leases.create", lease_id, leases.create(self.request(request))).await {
            Ok(_) => Ok(header),
            // Left over from an agent that died mid-run: reuse it, it is deleted below as usual.
            Err(e) if e.is_already_exists() => Ok(header),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn delete_lease(&self, lease_id: &str) -> Result<()> {
        let mut leases = LeasesClient::new(self.inner.channel.clone());
        let request = DeleteLeaseRequest { id: lease_id.to_string(), sync: false };
        match self.call("leases.delete", lease_id, leases.delete(self.request(request))).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The OCI chain ids of a layer stack: chain(0) = diff(0), chain(n) = sha256(chain(n-1) + " " + diff(n)).
/// The snapshot of the top layer is named by the last one.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => format!("sha256:{}", hex(&Sha256::digest(format!("{parent} {diff}").as_bytes()))),
        };
        out.push(next);
    }
    out
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn is_index(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json" | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.manifest.v1+json" | "application/vnd.docker.distribution.manifest.v2+json"
    )
}

pub(super) struct ResolvedImage {
    name: String,
    config_digest: String,
    layers: Vec<Descriptor>,
    pub(super) chain_ids: Vec<String>,
    pub(super) config: ImageRuntimeConfig,
}

// Just the fields of the image JSON documents that running a container needs (lenient on the rest, so Docker
// and OCI variants both parse).

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<BlobRef>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: BlobRef,
    #[serde(default)]
    layers: Vec<BlobRef>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct BlobRef {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

impl BlobRef {
    fn to_descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }
}

#[derive(Deserialize, Clone)]
struct PlatformJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct ImageConfigJson {
    #[serde(default)]
    config: Option<ImageRuntimeConfig>,
    rootfs: RootFsJson,
}

#[derive(Deserialize)]
struct RootFsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ImageRuntimeConfig {
    #[serde(default)]
    pub(super) entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub(super) cmd: Option<Vec<String>>,
    #[serde(default)]
    pub(super) env: Option<Vec<String>>,
    #[serde(default)]
    pub(super) working_dir: Option<String>,
    #[serde(default)]
    pub(super) user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let expected = format!("sha256:{}", hex(&Sha256::digest(b"sha256:aaaa sha256:bbbb")));
        assert_eq!(ids[1], expected);
    }
}
