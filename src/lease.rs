//! Keeping a lease alive.
//!
//! etcd-client runs no background keep-alive: each refresh is a message on a keep-alive stream the caller
//! holds. [`Renewer`] holds that stream, reopens it after any failure, and answers the one question every
//! holder (a scheduler instance, a node agent, a host of simulated nodes) needs each period: is the lease
//! still alive? What to do when it is not differs per holder, so that stays with them.

use crate::error::{Error, Result};
use crate::store::Store;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::time::Duration;

/// How long to wait for etcd's answer to one refresh.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Renewer {
    store: Store,
    lease: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Renewer {
    pub fn new(store: Store, lease: i64) -> Self {
        Renewer { store, lease, stream: None }
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Switches to a new lease (after the old one lapsed and the holder granted another).
    pub fn set_lease(&mut self, lease: i64) {
        self.lease = lease;
        self.stream = None;
    }

    /// Refreshes the lease once. `Ok(true)`: alive; `Ok(false)`: it has lapsed (etcd says TTL 0); `Err`: etcd
    /// did not answer (the stream is reopened on the next call).
    pub async fn renew(&mut self) -> Result<bool> {
        if self.stream.is_none() {
            self.stream = Some(self.store.client().lease_client().keep_alive(self.lease).await?);
        }
        let (keeper, responses) = self.stream.as_mut().expect("opened above");
        let answer = async {
            keeper.keep_alive().await?;
            match tokio::time::timeout(ANSWER_TIMEOUT, responses.message()).await {
                Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
                Ok(Ok(None)) => Err(Error::InvalidArgument("the lease keep-alive stream ended".into())),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(Error::Timeout(ANSWER_TIMEOUT, "a lease keep-alive answer".into())),
            }
        };
        let result = answer.await;
        if !matches!(result, Ok(true)) {
            self.stream = None;
        }
        result
    }
}
