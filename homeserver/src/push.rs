//! Push rules (the user's stored set, or the spec's defaults), evaluated for unread
//! notification and highlight counts.

use ruma::push::{PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset};
use ruma::room_version_rules::RoomPowerLevelsRules;
use ruma::serde::Raw;
use ruma::{Int, OwnedUserId, RoomId, UInt, UserId};
use serde_json::Value;

/// What the rules say about one event for one user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub notify: bool,
    pub highlight: bool,
}

/// The room facts push conditions read.
#[derive(Debug, Clone)]
pub struct RoomFacts {
    pub room_id: String,
    pub member_count: u64,
    pub display_name: String,
    /// The `m.room.power_levels` content, if any.
    pub power_levels: Option<Value>,
    pub version: String,
    /// Room creators (version 12 gives them infinite power).
    pub creators: Vec<String>,
}

/// Polls a future that never waits (ruma's evaluation is `async` only for optional
/// callbacks, which are not set here).
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn power_ctx(facts: &RoomFacts) -> Option<PushConditionPowerLevelsCtx> {
    let pl = facts.power_levels.as_ref()?;
    let int = |v: &Value| v.as_i64().and_then(Int::new);
    let users = pl["users"]
        .as_object()
        .map(|o| o.iter().filter_map(|(k, v)| Some((UserId::parse(k.as_str()).ok()?, int(v)?))).collect())
        .unwrap_or_default();
    let users_default = int(&pl["users_default"]).unwrap_or_default();
    let notifications = serde_json::from_value(pl["notifications"].clone())
        .unwrap_or_else(|_| ruma::power_levels::NotificationPowerLevels::new());
    let rules = crate::room::pdu::rules(&facts.version).ok()?;
    let creators: Vec<OwnedUserId> =
        facts.creators.iter().filter_map(|c| UserId::parse(c.as_str()).ok()).collect();
    Some(PushConditionPowerLevelsCtx::new(
        users,
        users_default,
        notifications,
        RoomPowerLevelsRules::new(&rules.authorization, creators),
    ))
}

/// The default push rules of one user in one room, ready to evaluate events.
pub struct Evaluator {
    user: String,
    rules: Ruleset,
    ctx: Option<PushConditionRoomCtx>,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Evaluator {
    /// `rules`: the user's rule set (stored, or [`Ruleset::server_default`]).
    pub fn new(user: &str, facts: &RoomFacts, rules: Ruleset) -> Self {
        let (Ok(user_id), Ok(room_id)) = (UserId::parse(user), RoomId::parse(facts.room_id.as_str())) else {
            return Self { user: user.to_owned(), rules: Ruleset::new(), ctx: None };
        };
        let mut ctx = PushConditionRoomCtx::new(
            room_id,
            UInt::new(facts.member_count).unwrap_or_default(),
            user_id.clone(),
            facts.display_name.clone(),
        );
        if let Some(p) = power_ctx(facts) {
            ctx = ctx.with_power_levels(p);
        }
        Self { user: user.to_owned(), rules, ctx: Some(ctx) }
    }

    /// What the rules say about a client-format event (the user's own events never notify).
    pub fn evaluate(&self, event: &Value) -> Outcome {
        let Some(ctx) = &self.ctx else { return Outcome::default() };
        if event["sender"].as_str() == Some(self.user.as_str()) {
            return Outcome::default();
        }
        let Ok(raw) = serde_json::value::to_raw_value(event) else { return Outcome::default() };
        let raw: Raw<ruma::events::AnySyncTimelineEvent> = Raw::from_json(raw);
        let actions = ready(self.rules.get_actions(&raw, ctx));
        Outcome {
            notify: actions.iter().any(|a| a.should_notify()),
            highlight: actions.iter().any(|a| a.is_highlight()),
        }
    }
}
