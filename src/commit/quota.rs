//! A namespace's quota inside a commit: the claims of a namespace that has one compare its quota record and
//! rewrite it in the same transaction as their node ledgers, so two schedulers racing in one namespace cannot
//! both spend its last room (see [`crate::model::Quota`] for why use is not stored in the record).
//!
//! A transaction may write a key once, so all the claims on one quota in a round go into one unit: a flat
//! transaction over every node they touch. Claims of namespaces without a quota commit as before, node by node.

use crate::cell_state::CellSnapshot;
use crate::model::{NamespaceUse, Quota, QuotaClaim, Task};

/// The quota a unit's claims count against, as the committer believes it.
#[derive(Clone, Debug)]
pub(super) struct QuotaBase {
    pub namespace: String,
    /// The record's mod_revision the unit compares.
    pub revision: i64,
    pub record: Quota,
    /// What the namespace's tasks hold, the unit's claims included as they are taken.
    pub used: NamespaceUse,
}

impl QuotaBase {
    /// The quota of `namespace` in `snapshot`, if it has one.
    pub fn from_snapshot(snapshot: &CellSnapshot, namespace: &str) -> Option<QuotaBase> {
        let q = snapshot.quotas.get(namespace)?;
        Some(QuotaBase {
            namespace: namespace.to_string(),
            revision: q.mod_revision,
            record: (*q.value).clone(),
            used: snapshot.use_of(namespace),
        })
    }

    /// Takes `task` (evicting `victims`) against the quota if it fits, else says which limit it would pass.
    pub fn take<'a>(
        &mut self,
        task: &Task,
        victims: impl Iterator<Item = &'a Task>,
    ) -> Result<(), crate::model::QuotaDimension> {
        let mut trial = self.used;
        for v in victims.filter(|v| v.namespace == self.namespace && v.state.holds_resources()) {
            trial.remove(v.resources);
        }
        self.record.fits(&trial, task.resources)?;
        trial.add(task.resources);
        self.used = trial;
        Ok(())
    }

    /// The record as the claim writes it back: the same limits, and who claimed last.
    pub fn written(&self, by: &str, at_ms: u64) -> Quota {
        Quota { last_claim: Some(QuotaClaim { by: by.to_string(), at_ms }), ..self.record.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Job, JobKind, QuotaDimension};
    use crate::resources::Resources;

    fn task(ns: &str, cpu: u64) -> Task {
        let mut j = Job::new("j", JobKind::Batch, 1, Resources::new(cpu, 1 << 20));
        j.namespace = ns.into();
        Task::pending(&j, 0)
    }

    #[test]
    fn takes_until_a_limit_and_counts_victims_of_its_own_namespace_only() {
        let mut record = Quota::new("a");
        record.cpu_millis = Some(1000);
        record.tasks = Some(3);
        let mut q = QuotaBase { namespace: "a".into(), revision: 7, record, used: NamespaceUse::default() };
        assert!(q.take(&task("a", 400), std::iter::empty()).is_ok());
        assert!(q.take(&task("a", 400), std::iter::empty()).is_ok());
        assert_eq!(q.take(&task("a", 400), std::iter::empty()), Err(QuotaDimension::Cpu));
        assert_eq!(q.used.resources.cpu_millis, 800, "a refused task takes nothing");
        // Evicting a running task of the same namespace makes room; one of another namespace does not.
        let mut victim = task("a", 400);
        victim.state = crate::model::TaskState::Running;
        let mut stranger = task("b", 400);
        stranger.state = crate::model::TaskState::Running;
        assert_eq!(q.take(&task("a", 400), [&stranger].into_iter()), Err(QuotaDimension::Cpu));
        assert!(q.take(&task("a", 400), [&victim].into_iter()).is_ok());
        assert_eq!((q.used.resources.cpu_millis, q.used.tasks), (800, 2));
        assert!(q.take(&task("a", 100), std::iter::empty()).is_ok());
        assert_eq!(q.take(&task("a", 1), std::iter::empty()), Err(QuotaDimension::Tasks));
        assert_eq!(q.record.room_for(&q.used, Resources::new(50, 1)), 0);
        let w = q.written("batch-1", 5);
        assert_eq!((w.cpu_millis, w.last_claim.map(|c| c.by)), (Some(1000), Some("batch-1".into())));
    }
}
