//! Sharding the pipelines over the operator's replicas.
//!
//! Each replica holds a `coordination.k8s.io/v1` Lease of its own (named after the group and
//! its identity, labelled [`MEMBER_LABEL`]`=<group>`) and renews it every `renew`. It watches
//! the group's Leases: a member is live while its Lease keeps changing, judged by when this
//! replica saw it change, not by the `renewTime` written in it (as client-go's leader election
//! does, so clocks that differ between nodes do not matter). Pipelines are assigned to the live
//! members by rendezvous hashing with bounded loads ([`Membership::assign`]): even within one,
//! and computed alike by every replica that sees the same members and pipelines.
//!
//! Who actually runs a pipeline is recorded in its `status.owner`, written with the
//! resourceVersion as a precondition, so two replicas whose views of the members differ for
//! a moment cannot both claim it (see `placement` in the controller and the README, Sharding).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// The label that makes a Lease a member of a group.
pub const MEMBER_LABEL: &str = "philotes.io/member-of";

#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// Namespace of the Leases.
    pub namespace: String,
    /// The group: replicas of one operator share its pipelines (`--lease-name`).
    pub group: String,
    /// This replica (`$POD_NAME`).
    pub identity: String,
    /// A member whose Lease did not change for this long is gone.
    pub duration: Duration,
    /// How often a member renews its Lease.
    pub renew: Duration,
}

/// What this replica knows of the group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// This replica's own Lease is held and was renewed in time: only then does it own
    /// anything.
    pub member: bool,
    /// The live members' identities (this one included while `member`).
    pub live: BTreeSet<String>,
}

impl Membership {
    /// Assigns pipelines, given as (creation time, UID), to the live members: oldest first,
    /// each to the member of highest rendezvous weight (of UID and member name) that still has
    /// room, where room is an even split (the first `N mod M` members in name order take one
    /// more). So the members' loads differ by at most one, every replica that sees the same
    /// members and pipelines computes the same assignment without talking to the others, and
    /// a pipeline created or deleted moves few others (at most two in the unit test's 200).
    pub fn assign(&self, pipelines: &[(i64, String)]) -> HashMap<String, String> {
        let members: Vec<&String> = self.live.iter().collect();
        let mut out = HashMap::new();
        if members.is_empty() {
            return out;
        }
        let mut order: Vec<&(i64, String)> = pipelines.iter().collect();
        order.sort();
        order.dedup();
        let (q, r) = (order.len() / members.len(), order.len() % members.len());
        let mut room: Vec<usize> = (0..members.len()).map(|i| q + usize::from(i < r)).collect();
        for (_, uid) in order {
            let best = (0..members.len())
                .filter(|&i| room[i] > 0)
                .max_by_key(|&i| (weight(uid, members[i]), std::cmp::Reverse(i)));
            if let Some(i) = best {
                room[i] -= 1;
                out.insert(uid.clone(), members[i].clone());
            }
        }
        out
    }
}

/// FNV-1a 64 of `uid`, a zero byte and `member`, then a final mix (so members whose names
/// differ only at the end spread as well as any others).
fn weight(uid: &str, member: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes().chain([0]).chain(member.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The name of a member's Lease: `<group>-<identity>`, made a valid object name.
pub fn lease_name(group: &str, identity: &str) -> String {
    let raw = format!("{group}-{identity}").to_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name != raw || name.len() > 200 {
        // Two identities that differ only in what was replaced must not share a Lease.
        name.truncate(200);
        name = format!("{name}-{:016x}", weight(&raw, ""));
    }
    name.trim_matches(|c| c == '-' || c == '.').to_string()
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// When this replica last saw a member's Lease change.
struct Seen {
    version: String,
    at: Instant,
    /// When it was first seen, and whether it changed since.
    first: Instant,
    changed: bool,
}

/// Takes part in the group until dropped (or aborted), publishing the membership whenever it
/// changes. Renewing in time is what makes this replica a member: when it cannot (the API
/// server unreachable, its Lease taken over) for `duration - renew`, `member` turns false and
/// the replica must stop everything it runs before anyone else may take it (the others wait
/// `duration`).
pub async fn run(client: Client, cfg: MemberConfig, out: watch::Sender<Membership>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let name = lease_name(&cfg.group, &cfg.identity);
    let selector = format!("{MEMBER_LABEL}={}", cfg.group);
    let (store, writer) = reflector::store();
    let mut changes = Box::pin(
        watcher(api.clone(), watcher::Config::default().labels(&selector))
            .default_backoff()
            .reflect(writer)
            .touched_objects(),
    );
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut renewed: Option<Instant> = None;
    // Until the watch has listed the group once, this replica does not know the others: it
    // takes no part before then, or it would claim pipelines they run.
    let listed = store.clone();
    let mut listed = std::pin::pin!(listed.wait_until_ready());
    let (mut known, mut waited) = (false, false);
    // Once a member, a lapse ends this replica's membership for good: it stops everything and
    // exits, and joins again as a new process. A renewal that succeeds after the lapse (a
    // process frozen and resumed) does not bring it back.
    let mut was_member = false;
    let mut lapsed = false;
    // This replica announces itself (creates its Lease, and the others start handing it its
    // share) only once it judges the others as they judge each other: each Lease seen to
    // change (live) or seen unchanged for its duration (gone). Judging a crashed replica's
    // Lease live from first sight, it would leave that replica's share to no one for up to
    // a lease duration while the others handed it over.
    let (mut joinable, mut joined) = (false, false);
    let keep_for = cfg.duration.saturating_sub(cfg.renew);
    let mut tick = tokio::time::interval(cfg.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // When the last renewal stops counting, whatever else is going on.
        let lapse = renewed.map_or_else(|| Instant::now() + cfg.duration, |t| t + keep_for);
        tokio::select! {
            _ = tokio::time::sleep_until(lapse), if renewed.is_some() && was_member => {}
            _ = tick.tick() => {
                // Checked before renewing, so a renewal after a long freeze cannot hide it.
                if was_member && renewed.is_some_and(|t| t.elapsed() >= keep_for) {
                    lapsed = true;
                }
                joined |= joinable;
                // Bounded: an API server that does not answer (this replica cut off from
                // it) must not hold the membership up.
                // A lapsed member renews no more: a renewal would make the others count it
                // live, and hand it a share, while it stops everything and exits.
                let attempt = if joined && !lapsed {
                    tokio::time::timeout(cfg.renew / 2, renew(&api, &store, &cfg, &name)).await
                } else {
                    Ok(Ok(Renewal::Waiting))
                };
                match attempt.unwrap_or_else(|_| Err(kube::Error::Service("no answer within the renew interval".into()))) {
                    Ok(Renewal::Waiting) => tracing::debug!("watching the other replicas before joining"),
                    Ok(Renewal::Renewed) => renewed = Some(Instant::now()),
                    Ok(Renewal::HeldByOther) => {
                        tracing::warn!(lease = %name, "the member lease is held by someone else");
                        renewed = None;
                    }
                    Ok(Renewal::Conflict) => tracing::warn!(lease = %name, "the member lease changed while being renewed"),
                    Err(e) => tracing::warn!(lease = %name, error = %e, "cannot renew the member lease"),
                }
            }
            change = changes.next() => {
                if let Some(Err(e)) = change {
                    tracing::debug!(error = %e, "member lease watch");
                }
            }
            ready = &mut listed, if !waited => {
                waited = true;
                known = ready.is_ok();
            }
        }
        if was_member && renewed.is_none_or(|t| t.elapsed() >= keep_for) {
            lapsed = true;
        }
        let member = !lapsed && known && renewed.is_some_and(|t| t.elapsed() < keep_for);
        was_member |= member;
        let now = Instant::now();
        let mut live = BTreeSet::new();
        let mut judged = known;
        let leases = store.state();
        seen.retain(|n, _| leases.iter().any(|l| l.name_any() == *n));
        for lease in leases {
            let Some(spec) = lease.spec.as_ref() else {
                continue;
            };
            let Some(holder) = spec.holder_identity.clone() else {
                continue;
            };
            let version = lease.resource_version().unwrap_or_default();
            let entry = seen.entry(lease.name_any()).or_insert_with(|| Seen {
                version: version.clone(),
                at: now,
                first: now,
                changed: false,
            });
            if entry.version != version {
                entry.version = version;
                entry.at = now;
                entry.changed = true;
            }
            let lasts =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            if holder != cfg.identity && !entry.changed && now.duration_since(entry.first) < lasts {
                judged = false;
            }
            // A replica that died without leaving (SIGKILL, an evicted pod) leaves its Lease
            // behind; once it has not changed for ten lease durations it is removed, so a
            // replica starting later does not wait for it. Best effort: another replica may
            // remove it first.
            if holder != cfg.identity && now.duration_since(entry.at) > lasts * 10 {
                let gone = lease.name_any();
                tracing::info!(lease = %gone, holder = %holder, "removing the Lease of a replica gone for ten lease durations");
                // Only the version seen unchanged for so long: a Lease renewed meanwhile
                // (this watch stalled, not its holder) is left alone.
                let unchanged = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(entry.version.clone()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                let _ = tokio::time::timeout(cfg.renew / 2, api.delete(&gone, &unchanged)).await;
                continue;
            }
            if holder != cfg.identity && now.duration_since(entry.at) < lasts {
                live.insert(holder);
            }
        }
        joinable = judged;
        if member {
            live.insert(cfg.identity.clone());
        }
        let membership = Membership { member, live };
        out.send_if_modified(|m| {
            if *m == membership {
                return false;
            }
            tracing::info!(identity = %cfg.identity, member = membership.member,
                live = ?membership.live, "operator replicas changed");
            *m = membership;
            true
        });
    }
}

/// What a renewal did.
#[derive(Debug, PartialEq, Eq)]
enum Renewal {
    Renewed,
    /// Another identity holds this replica's Lease.
    HeldByOther,
    /// Someone changed the Lease since it was read: not renewed this time.
    Conflict,
    /// Not announced yet: still judging the other replicas.
    Waiting,
}

/// Creates or renews this replica's Lease: one request from the watch's copy and its
/// resourceVersion, read again and retried once if that copy was behind.
async fn renew(
    api: &Api<Lease>,
    store: &Store<Lease>,
    cfg: &MemberConfig,
    name: &str,
) -> Result<Renewal, kube::Error> {
    let cached = store
        .state()
        .into_iter()
        .find(|l| l.name_any() == name)
        .map(|l| (*l).clone());
    let first = match cached {
        Some(lease) => put(api, cfg, name, Some(lease)).await?,
        None => Renewal::Conflict,
    };
    if first != Renewal::Conflict {
        return Ok(first);
    }
    let fresh = api.get_opt(name).await?;
    put(api, cfg, name, fresh).await
}

/// Creates the Lease (`None`) or renews the one read, with its resourceVersion as the
/// precondition.
async fn put(
    api: &Api<Lease>,
    cfg: &MemberConfig,
    name: &str,
    known: Option<Lease>,
) -> Result<Renewal, kube::Error> {
    let secs = cfg.duration.as_secs().max(1) as i32;
    let now = micro_now();
    let result = match known {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(cfg.namespace.clone()),
                    labels: Some([(MEMBER_LABEL.to_string(), cfg.group.clone())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
                return Ok(Renewal::HeldByOther);
            }
            spec.lease_duration_seconds = Some(secs);
            spec.renew_time = Some(now);
            api.replace(name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => Ok(Renewal::Renewed),
        // Changed, or deleted (by a replica that judged it stale), since it was read: read
        // again, and created anew if it is gone.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(Renewal::Conflict),
        Err(e) => Err(e),
    }
}

/// Leaves the group (on shutdown, once every pipeline stopped): the others see the Lease go
/// through their watch and take this replica's pipelines over at once.
pub async fn leave(client: Client, cfg: &MemberConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let name = lease_name(&cfg.group, &cfg.identity);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(lease = %name, "left the operator's replicas"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "cannot delete the member lease; the others take over when it expires")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Membership {
        Membership {
            member: true,
            live: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn load(assigned: &HashMap<String, String>) -> Vec<usize> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for m in assigned.values() {
            *counts.entry(m.as_str()).or_default() += 1;
        }
        let mut v: Vec<usize> = counts.into_values().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn pipelines_are_split_evenly_and_a_new_one_moves_few_others() {
        let pipelines: Vec<(i64, String)> = (0..200)
            .map(|i| {
                (
                    1_700_000_000 + i / 7,
                    format!("4f1c2a7e-{i:04}-4c1b-9d7e-2b2f5a0c{i:04}"),
                )
            })
            .collect();
        let three = members(&["philotes-7d9f-a", "philotes-7d9f-b", "philotes-7d9f-c"]);
        for n in [1, 2, 3, 31, 32, 33, 200] {
            let a = three.assign(&pipelines[..n]);
            assert_eq!(a.len(), n);
            let l = load(&a);
            assert!(
                l.last().unwrap() - l.first().unwrap() <= 1 && (n < 3 || l.len() == 3),
                "{n}: {l:?}"
            );
            // Deterministic: the same input in another order gives the same assignment.
            let mut reversed = pipelines[..n].to_vec();
            reversed.reverse();
            assert_eq!(three.assign(&reversed), a);
        }
        // A newer pipeline moves few older ones (the even split has to take it in).
        let mut moved = Vec::new();
        for n in 1..200 {
            let before = three.assign(&pipelines[..n]);
            let after = three.assign(&pipelines[..=n]);
            moved.push(before.iter().filter(|(uid, m)| after[*uid] != **m).count());
        }
        assert!(moved.iter().all(|m| *m <= 2), "{moved:?}");
        assert!(moved.iter().sum::<usize>() < moved.len(), "{moved:?}");
        // A member leaves: the others take its pipelines, still within one of even.
        let two = members(&["philotes-7d9f-a", "philotes-7d9f-c"]);
        let a = two.assign(&pipelines);
        assert_eq!(load(&a), [100, 100]);
        // A member joins: it takes its share.
        let four = members(&[
            "philotes-7d9f-a",
            "philotes-7d9f-b",
            "philotes-7d9f-c",
            "philotes-7d9f-d",
        ]);
        assert_eq!(load(&four.assign(&pipelines)), [50, 50, 50, 50]);
        assert!(members(&[]).assign(&pipelines).is_empty());
    }

    #[test]
    fn lease_names_are_valid_and_distinct() {
        assert_eq!(
            lease_name("philotes-controller", "philotes-5f6d8-x2x"),
            "philotes-controller-philotes-5f6d8-x2x"
        );
        let a = lease_name("g", "Host_1");
        let b = lease_name("g", "host-1");
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
        assert!(lease_name("g", &"x".repeat(300)).len() <= 253);
    }
}
