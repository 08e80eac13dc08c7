//! Authorization rules and state resolution, over events already in memory.
//!
//! ruma-state-res does the rule work; its callbacks are synchronous, so callers prefetch what
//! it reads (the auth chains of the states being resolved) in batches before calling here.

use std::collections::{BTreeMap, HashMap, HashSet};

use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::StateResolutionVersion;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId, UserId};

use super::pdu::{Pdu, StateMap, rules};

/// The `(type, state_key)` pairs whose current events authorize an event of this shape.
pub fn auth_types(
    version: &str,
    kind: &str,
    sender: &str,
    state_key: Option<&str>,
    content: &serde_json::Value,
) -> Result<Vec<(String, String)>, String> {
    let rules = rules(version).map_err(|e| e.to_string())?;
    let sender = UserId::parse(sender).map_err(|e| e.to_string())?;
    let raw = serde_json::value::to_raw_value(content).map_err(|e| e.to_string())?;
    let types = ruma::state_res::auth_types_for_event(
        &TimelineEventType::from(kind),
        &sender,
        state_key,
        &raw,
        &rules.authorization,
    )?;
    Ok(types.into_iter().map(|(t, k)| (t.to_string(), k)).collect())
}

/// Checks `event` against the authorization rules of `version`: its own `auth_events` (fetched
/// with `fetch_event`), and the room state it is appended to (`state`).
pub fn check(
    version: &str,
    event: &Pdu,
    fetch_event: impl Fn(&EventId) -> Option<Pdu>,
    state: impl Fn(&str, &str) -> Option<Pdu>,
) -> Result<(), String> {
    let rules = rules(version).map_err(|e| e.to_string())?;
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, event, &fetch_event)?;
    ruma::state_res::check_state_dependent_auth_rules(
        &rules.authorization,
        event,
        |t: &StateEventType, k: &str| state(&t.to_string(), k),
    )
}

/// Resolves several states of one room into one (state resolution v2; v2.1 for room version
/// 12). `events` must hold every event of the states and of their auth chains.
pub fn resolve(
    version: &str,
    states: &[StateMap<OwnedEventId>],
    events: &HashMap<OwnedEventId, Pdu>,
) -> Result<StateMap<OwnedEventId>, String> {
    let rules = rules(version).map_err(|e| e.to_string())?;
    let StateResolutionVersion::V2(v2) = &rules.state_res else {
        return Err(format!("room version {version} does not use state resolution v2"));
    };
    let maps: Vec<ruma::state_res::StateMap<OwnedEventId>> = states
        .iter()
        .map(|s| {
            s.iter().map(|((t, k), id)| ((StateEventType::from(t.as_str()), k.clone()), id.clone())).collect()
        })
        .collect();
    let auth_chains: Vec<EventIdSet<OwnedEventId>> =
        states.iter().map(|s| auth_chain(s.values(), events)).collect::<Result<_, _>>()?;
    let resolved = ruma::state_res::resolve(
        &rules.authorization,
        v2,
        maps.iter(),
        auth_chains,
        |id| events.get(id).cloned(),
        |conflicted| conflicted_subgraph(conflicted.values().flatten(), events),
    )
    .map_err(|e| e.to_string())?;
    Ok(resolved.into_iter().map(|((t, k), id)| ((t.to_string(), k), id)).collect())
}

/// Every event reachable from `from` through `auth_events`, `from` excluded unless reachable.
fn auth_chain<'a>(
    from: impl Iterator<Item = &'a OwnedEventId>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> Result<EventIdSet<OwnedEventId>, String> {
    let mut seen = EventIdSet::new();
    let mut todo: Vec<&OwnedEventId> = from.collect();
    while let Some(id) = todo.pop() {
        let pdu = events.get(id).ok_or_else(|| format!("event {id} was not prefetched"))?;
        for a in &pdu.auth_events {
            if seen.insert(a.clone()) {
                todo.push(a);
            }
        }
    }
    Ok(seen)
}

/// Room version 12's conflicted state subgraph: the conflicted events and every event on an
/// `auth_events` path between two of them.
fn conflicted_subgraph<'a>(
    conflicted: impl Iterator<Item = &'a OwnedEventId>,
    events: &HashMap<OwnedEventId, Pdu>,
) -> Option<EventIdSet<OwnedEventId>> {
    let conflicted: HashSet<&OwnedEventId> = conflicted.collect();
    // Events reachable from a conflicted event (one step or more).
    let mut below: HashSet<&OwnedEventId> = HashSet::new();
    let mut todo: Vec<&OwnedEventId> = conflicted.iter().copied().collect();
    while let Some(id) = todo.pop() {
        for a in &events.get(id)?.auth_events {
            if below.insert(a) {
                todo.push(a);
            }
        }
    }
    // Of those, the ones that reach a conflicted event: walk each, memoised.
    let mut reaches: BTreeMap<&OwnedEventId, bool> = BTreeMap::new();
    fn reaches_conflicted<'b>(
        id: &'b OwnedEventId,
        events: &'b HashMap<OwnedEventId, Pdu>,
        conflicted: &HashSet<&OwnedEventId>,
        memo: &mut BTreeMap<&'b OwnedEventId, bool>,
    ) -> bool {
        if let Some(r) = memo.get(id) {
            return *r;
        }
        memo.insert(id, false);
        let r = events.get(id).is_some_and(|p| {
            p.auth_events
                .iter()
                .any(|a| conflicted.contains(a) || reaches_conflicted(a, events, conflicted, memo))
        });
        memo.insert(id, r);
        r
    }
    let mut out: EventIdSet<OwnedEventId> = conflicted.iter().map(|id| (*id).clone()).collect();
    for id in below {
        if reaches_conflicted(id, events, &conflicted, &mut reaches) {
            out.insert(id.clone());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
