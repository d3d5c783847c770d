//! Filling etcd's space quota, and freeing it the way the README's troubleshooting section does.

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, CompactionOptions, DeleteOptions};
use omega::store::Store;
use omega::Error;

/// Writes values until etcd refuses even a small one for lack of space (a large one is refused while smaller
/// ones still fit, so the values shrink as it fills). Returns the keys written, under `/filler/`. Writes
/// straight through the client, so this process's store has not seen the refusal.
pub async fn fill_until_no_space(store: &Store) -> usize {
    let mut kv = store.client().kv_client();
    let mut i = 0;
    for size in [256 << 10, 16 << 10, 1 << 10, 16] {
        loop {
            assert!(i < 2000, "etcd never ran out of space");
            match kv.put(format!("/filler/{i}"), vec![b'x'; size], None).await.map_err(Error::from) {
                Ok(_) => i += 1,
                Err(e) if e.is_no_space() => break,
                Err(e) => panic!("filling etcd: {e}"),
            }
        }
    }
    i
}

/// Frees the space of a full etcd with the same RPCs as the printed commands: drop what filled it, compact
/// physically, defragment, disarm every alarm.
pub async fn free_space(store: &Store) {
    let mut client = store.client();
    client.delete("/filler/", Some(DeleteOptions::new().with_prefix())).await.expect("delete the filler");
    let revision = store.revision().await.expect("revision");
    client.compact(revision, Some(CompactionOptions::new().with_physical())).await.expect("compact");
    client.defragment().await.expect("defragment");
    let alarms = client.alarm(AlarmAction::Get, AlarmType::None, None).await.expect("list alarms");
    for alarm in alarms.alarms() {
        let mut options = AlarmOptions::new();
        options.with_member(alarm.member_id());
        client.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options)).await.expect("disarm");
    }
}
