//! The decision function, case by case, on a view of four nodes: 1 (this
//! node), 2 and 3 Online, 4 as each test sets it.

use std::time::Instant;

use super::*;
use crate::balancer::{SessionsBalancer, UserHashBalancer};
use crate::cluster::{NodeRecord, SessionRecord};
use crate::proxy::cookie::Affinity;

fn node(id: NodeId) -> NodeRecord {
    NodeRecord {
        id,
        host: format!("127.0.0.{}", id + 1),
        port: 8787,
        status: NodeStatus::Online,
        last_seen: Some(0),
        ..NodeRecord::for_test()
    }
}

fn view_with(fourth: impl FnOnce(&mut NodeRecord)) -> ClusterView {
    let view = ClusterView::new(1);
    let mut four = node(4);
    fourth(&mut four);
    view.set_nodes(vec![node(1), node(2), node(3), four]);
    view
}

fn session(key: &str, node: NodeId, user: Option<&str>, kind: SessionKind, last_active: i64) -> SessionRecord {
    SessionRecord {
        key: key.into(),
        node_id: Some(node),
        user_name: user.map(Into::into),
        kind,
        created: 1,
        last_active,
    }
}

struct Case {
    view: ClusterView,
    degraded: DegradedPlacements,
    here_serves: bool,
    key_failover_after: Duration,
}

impl Case {
    fn new(view: ClusterView) -> Case {
        Case {
            view,
            degraded: DegradedPlacements::default(),
            here_serves: true,
            key_failover_after: Duration::from_secs(60),
        }
    }

    fn decide(&self, facts: &RequestFacts) -> Decision {
        self.decide_with(&SessionsBalancer, facts)
    }

    fn decide_at(&self, facts: &RequestFacts, now: Instant) -> Decision {
        let m = Memory {
            view: &self.view,
            here: 1,
            here_serves: self.here_serves,
            balancer: &SessionsBalancer,
            degraded: &self.degraded,
            key_failover_after: self.key_failover_after,
        };
        decide(&m, facts, now, 1_000_000)
    }

    fn decide_with(&self, balancer: &dyn Balancer, facts: &RequestFacts) -> Decision {
        let m = Memory {
            view: &self.view,
            here: 1,
            here_serves: self.here_serves,
            balancer,
            degraded: &self.degraded,
            key_failover_after: self.key_failover_after,
        };
        decide(&m, facts, Instant::now(), 1_000_000)
    }
}

fn pin_to(node: NodeId) -> RequestFacts {
    let pin = Pin { id: "AAAAAAAAAAAAAAAAAAAAAA".into(), node, issued: 999_000 };
    RequestFacts { cookie: Some(Arc::new(AffinityCookie::Pin(pin))), ..Default::default() }
}

fn user(name: &str) -> RequestFacts {
    RequestFacts { user: Some(name.into()), ..Default::default() }
}

fn peer(id: NodeId) -> Route {
    Route::Peer { id, addr: format!("127.0.0.{}:8787", id + 1).parse().unwrap() }
}

#[test]
fn a_registered_backend_key_wins_over_a_pin_that_points_elsewhere() {
    let c = Case::new(view_with(|_| {}));
    c.view.upsert_session(session("k1", 3, None, SessionKind::Backend, 1));
    let facts = RequestFacts { path_key: Some("k1".into()), ..pin_to(2) };
    match c.decide(&facts) {
        Decision::Session { entry, route, found } => {
            assert_eq!((entry.record.key.as_str(), route, found), ("k1", peer(3), Found::PathKey));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_registered_backend_key_wins_over_the_users_other_sessions() {
    let c = Case::new(view_with(|_| {}));
    c.view.upsert_session(session("user:ann", 2, Some("ann"), SessionKind::User, 500));
    c.view.upsert_session(session("k1", 3, Some("ann"), SessionKind::Backend, 100));
    let facts = RequestFacts { path_key: Some("k1".into()), ..user("ann") };
    assert!(matches!(c.decide(&facts), Decision::Session { route, found: Found::PathKey, .. } if route == peer(3)));
    // Without the key in the path, the user's most recent session.
    assert!(matches!(c.decide(&user("ann")), Decision::Session { route, found: Found::User, .. } if route == peer(2)));
}

#[test]
fn a_backend_key_of_a_node_that_may_come_back_is_held_then_moved_after_the_failover_delay() {
    let key = || RequestFacts { path_key: Some("k1".into()), ..Default::default() };
    for (fourth, reason) in [(NodeStatus::Offline, MoveReason::Stopped), (NodeStatus::Starting, MoveReason::Stopped)] {
        let c = Case::new(view_with(|n| n.status = fourth));
        c.view.upsert_session(session("k1", 4, None, SessionKind::Backend, 1));
        let t0 = Instant::now();
        assert!(
            matches!(c.decide_at(&key(), t0), Decision::Hold { reason: r, retry_after, .. } if r == reason && retry_after == Duration::from_secs(60)),
            "{fourth:?}"
        );
        // Counted from when the node was first seen failing, not per request.
        let later = t0 + Duration::from_secs(59);
        assert!(
            matches!(c.decide_at(&key(), later), Decision::Hold { retry_after, .. } if retry_after == Duration::from_secs(1))
        );
        let past = t0 + Duration::from_secs(60);
        assert!(
            matches!(c.decide_at(&key(), past), Decision::Move { reason: r, found: Found::PathKey, .. } if r == reason),
            "{fourth:?}"
        );
    }
    // Unreachable: counted from the mark.
    let c = Case::new(view_with(|_| {}));
    c.view.upsert_session(session("k1", 4, None, SessionKind::Backend, 1));
    c.view.mark_unreachable(4);
    let marked = Instant::now();
    assert!(matches!(c.decide(&key()), Decision::Hold { reason: MoveReason::Unreachable, .. }));
    let past = marked + Duration::from_secs(61);
    assert!(matches!(c.decide_at(&key(), past), Decision::Move { reason: MoveReason::Unreachable, .. }));
    // Reachable again and down again: a new count.
    c.view.mark_reachable(4);
    assert!(matches!(c.decide(&key()), Decision::Session { route, .. } if route == peer(4)));
    c.view.mark_unreachable(4);
    let soon = Instant::now() + Duration::from_secs(30);
    assert!(matches!(c.decide_at(&key(), soon), Decision::Hold { .. }));
    // This node's backend down: its own keys are held too.
    let mut c = Case::new(view_with(|_| {}));
    c.here_serves = false;
    c.view.upsert_session(session("k1", 1, None, SessionKind::Backend, 1));
    assert!(matches!(c.decide(&key()), Decision::Hold { reason: MoveReason::BackendDown, .. }));
    // Zero: never moved.
    let mut c = Case::new(view_with(|n| n.status = NodeStatus::Offline));
    c.key_failover_after = Duration::ZERO;
    c.view.upsert_session(session("k1", 4, None, SessionKind::Backend, 1));
    let far = Instant::now() + Duration::from_secs(365 * 86_400);
    assert!(matches!(c.decide_at(&key(), far), Decision::Hold { retry_after: Duration::MAX, .. }));
}

#[test]
fn a_backend_key_of_a_deleted_node_or_a_router_moves_at_once_and_users_keep_moving() {
    let key = || RequestFacts { path_key: Some("k1".into()), ..Default::default() };
    for (change, reason) in [
        ((|n| n.status = NodeStatus::Deleting) as fn(&mut NodeRecord), MoveReason::Deleted),
        (|n| n.router = true, MoveReason::Router),
    ] {
        let c = Case::new(view_with(change));
        c.view.upsert_session(session("k1", 4, None, SessionKind::Backend, 1));
        assert!(matches!(c.decide(&key()), Decision::Move { reason: r, found: Found::PathKey, .. } if r == reason));
    }
    // A node deleted from the registry (not in the view at all).
    let c = Case::new(view_with(|_| {}));
    c.view.upsert_session(session("k2", 9, None, SessionKind::Backend, 1));
    let facts = RequestFacts { path_key: Some("k2".into()), ..Default::default() };
    assert!(matches!(c.decide(&facts), Decision::Move { reason: MoveReason::Deleted, .. }));
    // A user's own session on an unreachable node: placed anew at once.
    c.view.upsert_session(session("user:ann", 4, Some("ann"), SessionKind::User, 1));
    c.view.mark_unreachable(4);
    assert!(matches!(c.decide(&user("ann")), Decision::PlaceUser { .. }));
}

#[test]
fn retry_after_is_the_check_interval_or_what_is_left_and_at_least_a_second() {
    let check = Duration::from_secs(2);
    assert_eq!(retry_after_secs(Duration::from_secs(50), check), 2);
    assert_eq!(retry_after_secs(Duration::from_millis(1500), check), 2);
    assert_eq!(retry_after_secs(Duration::from_millis(10), check), 1);
    assert_eq!(retry_after_secs(Duration::MAX, Duration::from_millis(100)), 1);
}

#[test]
fn a_users_most_recent_live_session_is_used() {
    let c = Case::new(view_with(|n| n.status = NodeStatus::Offline));
    c.view.upsert_session(session("user:ann", 2, Some("ann"), SessionKind::User, 100));
    // More recent, but on a stopped node: not usable.
    c.view.upsert_session(session("k4", 4, Some("ann"), SessionKind::Backend, 900));
    c.view.upsert_session(session("k3", 3, Some("ann"), SessionKind::Backend, 500));
    match c.decide(&user("ann")) {
        Decision::Session { entry, route, found: Found::User } => {
            assert_eq!((entry.record.key.as_str(), route), ("k3", peer(3)));
        }
        other => panic!("{other:?}"),
    }
    // The user's pin (anywhere) does not matter.
    let facts = RequestFacts { user: Some("ann".into()), ..pin_to(2) };
    assert!(matches!(c.decide(&facts), Decision::Session { route, .. } if route == peer(3)));
}

#[test]
fn a_verified_user_without_a_live_session_is_placed() {
    let c = Case::new(view_with(|n| n.status = NodeStatus::Offline));
    c.view.upsert_session(session("user:ann", 4, Some("ann"), SessionKind::User, 100));
    // Even with a pin to a live node: a known user is placed, not pinned.
    let facts = RequestFacts { user: Some("ann".into()), ..pin_to(2) };
    assert!(matches!(c.decide(&facts), Decision::PlaceUser { user } if user == "ann"));
    assert!(matches!(c.decide(&user("bob")), Decision::PlaceUser { .. }));
}

#[test]
fn a_user_placed_from_memory_stays_there_until_registered() {
    let c = Case::new(view_with(|_| {}));
    c.degraded.remember("ann", 3);
    assert!(matches!(c.decide(&user("ann")), Decision::Degraded { node: 3, route, .. } if route == peer(3)));
    // Its node failed meanwhile: placed anew.
    c.view.mark_unreachable(3);
    assert!(matches!(c.decide(&user("ann")), Decision::PlaceUser { .. }));
    // A registered session wins over the memory.
    c.view.upsert_session(session("user:ann", 2, Some("ann"), SessionKind::User, 1));
    assert!(matches!(c.decide(&user("ann")), Decision::Session { route, found: Found::User, .. } if route == peer(2)));
}

#[test]
fn an_anonymous_browser_follows_a_pin_to_a_node_that_can_serve() {
    let c = Case::new(view_with(|_| {}));
    assert!(matches!(c.decide(&pin_to(3)), Decision::Pinned { route, .. } if route == peer(3)));
    assert!(matches!(c.decide(&pin_to(1)), Decision::Pinned { route: Route::Local, .. }));
    // Offline mode keeps existing pins (drain) ...
    let c = Case::new(view_with(|n| n.offline_mode = true));
    assert!(matches!(c.decide(&pin_to(4)), Decision::Pinned { route, .. } if route == peer(4)));
    // ... and takes no new ones.
    for _ in 0..50 {
        match c.decide(&RequestFacts::default()) {
            Decision::NewPin { pin, reason: PinReason::New, .. } => assert_ne!(pin.node, 4),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_pin_to_a_node_that_cannot_take_it_is_replaced_keeping_its_id() {
    type Change = fn(&mut NodeRecord);
    let cases: [(Change, MoveReason); 4] = [
        (|n| n.status = NodeStatus::Offline, MoveReason::Stopped),
        (|n| n.status = NodeStatus::Deleting, MoveReason::Deleted),
        (|n| n.router = true, MoveReason::Router),
        (|n| n.id = 5, MoveReason::Deleted),
    ];
    for (change, reason) in cases {
        let c = Case::new(view_with(change));
        match c.decide(&pin_to(4)) {
            Decision::NewPin { pin, route, reason: PinReason::Replaced(why) } => {
                assert_eq!(why, reason);
                assert_eq!(pin.id, "AAAAAAAAAAAAAAAAAAAAAA", "the browser keeps its pin id");
                assert_ne!(pin.node, 4);
                assert_eq!(pin.issued, 1_000_000);
                assert_eq!(route, if pin.node == 1 { Route::Local } else { peer(pin.node) });
            }
            other => panic!("{reason:?}: {other:?}"),
        }
    }
    // Unreachable.
    let c = Case::new(view_with(|_| {}));
    c.view.mark_unreachable(4);
    assert!(matches!(
        c.decide(&pin_to(4)),
        Decision::NewPin { reason: PinReason::Replaced(MoveReason::Unreachable), .. }
    ));
    // This node, with its backend down.
    let mut c = Case::new(view_with(|_| {}));
    c.here_serves = false;
    match c.decide(&pin_to(1)) {
        Decision::NewPin { pin, reason: PinReason::Replaced(MoveReason::BackendDown), .. } => assert_ne!(pin.node, 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fresh_anonymous_browsers_spread_over_equal_nodes_with_no_identity_anywhere() {
    for balancer in [&SessionsBalancer as &dyn Balancer, &UserHashBalancer::new(1.25)] {
        let c = Case::new(view_with(|_| {}));
        let mut per_node = [0usize; 5];
        for _ in 0..400 {
            match c.decide_with(balancer, &RequestFacts::default()) {
                Decision::NewPin { pin, reason: PinReason::New, .. } => {
                    // As `route` does: the node's own estimate counts the pin.
                    c.view.pins().record(pin.node, Instant::now());
                    per_node[pin.node as usize] += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(per_node[1..].iter().all(|n| (70..=130).contains(n)), "{}: {per_node:?}", balancer.name());
    }
}

#[test]
fn a_legacy_cookie_is_routed_by_its_session_until_that_is_gone() {
    let c = Case::new(view_with(|_| {}));
    let legacy = Affinity::new("BBBBBBBBBBBBBBBBBBBBBB".into(), 999_000);
    c.view.upsert_session(session(legacy.session_key(), 3, None, SessionKind::Affinity, 1));
    let facts = RequestFacts { cookie: Some(Arc::new(AffinityCookie::Legacy(legacy.clone()))), ..Default::default() };
    assert!(matches!(c.decide(&facts), Decision::Session { route, found: Found::Legacy, .. } if route == peer(3)));
    // Also for a signed-in user without a session of their own (an older version's session).
    let signed_in = RequestFacts { user: Some("ann".into()), ..facts.clone() };
    assert!(matches!(c.decide(&signed_in), Decision::Session { found: Found::Legacy, .. }));
    // The session ended (idle): the browser is pinned like any other.
    c.view.remove_session(legacy.session_key());
    assert!(matches!(c.decide(&facts), Decision::NewPin { reason: PinReason::New, .. }));
}

#[test]
fn no_eligible_node_means_no_node() {
    let mut c = Case::new(view_with(|n| n.offline_mode = true));
    c.here_serves = false;
    for id in [2, 3] {
        c.view.mark_unreachable(id);
    }
    assert!(matches!(c.decide(&RequestFacts::default()), Decision::NoNode));
    // Existing pins to a draining node still work.
    assert!(matches!(c.decide(&pin_to(4)), Decision::Pinned { .. }));
}

#[test]
fn candidates_are_eligible_nodes_with_sessions_and_recent_pins() {
    let view = view_with(|n| n.offline_mode = true);
    view.upsert_session(session("a", 2, None, SessionKind::Backend, 1));
    view.upsert_session(session("b", 2, None, SessionKind::Backend, 1));
    let now = Instant::now();
    view.pins().record(3, now);
    let all = candidates(&view, 1, true, &[], now);
    let summary: Vec<(NodeId, usize, usize)> = all.iter().map(|c| (c.id, c.sessions, c.recent_pins)).collect();
    assert_eq!(summary, [(1, 0, 0), (2, 2, 0), (3, 0, 1)], "node 4 is in offline mode");
    assert_eq!(&*all[1].address, "127.0.0.3:8787");
    let ids = |c: Vec<Candidate>| c.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(candidates(&view, 1, false, &[], now)), [2, 3], "not this node while its backend is down");
    assert_eq!(ids(candidates(&view, 1, true, &[2], now)), [1, 3]);
}

#[test]
fn backend_keys_come_from_the_path_pattern() {
    let pattern = |s: &str| SessionPathPattern::parse(s).unwrap();
    let p = pattern("/s/{key}/");
    assert_eq!(path_key(&p, "/s/3a9e1f00c2b1a4d5e6f70/").as_deref(), Some("3a9e1f00c2b1a4d5e6f70"));
    assert_eq!(path_key(&p, "/s/abc/rpc/console_input").as_deref(), Some("abc"));
    assert_eq!(path_key(&p, "/s/abc").as_deref(), Some("abc"));
    assert_eq!(path_key(&p, "/s/"), None);
    assert_eq!(path_key(&p, "/s/../etc/passwd"), None);
    assert_eq!(path_key(&p, "/s/ab%2Fc/"), None, "no encoded separators");
    assert_eq!(path_key(&p, "/x/abc/"), None);
    assert_eq!(path_key(&p, &format!("/s/{}/", "a".repeat(129))), None);
    let jupyter = pattern("/user/{key}/");
    assert_eq!(path_key(&jupyter, "/user/alice/lab").as_deref(), Some("alice"));
}

#[test]
fn a_backend_key_found_by_a_lookup_routes_when_the_view_could_not_keep_it() {
    let c = Case { view: ClusterView::with_session_capacity(1, 1), ..Case::new(ClusterView::new(1)) };
    c.view.set_nodes(vec![node(1), node(2), node(3)]);
    c.view.upsert_session(session("first", 2, None, SessionKind::Backend, 1));
    let looked_up = c.view.upsert_session(session("k1", 3, None, SessionKind::Backend, 1));
    assert!(c.view.session("k1").is_none(), "the view is full");
    let facts = RequestFacts { path_key: Some("k1".into()), path_session: Some(looked_up), ..pin_to(2) };
    assert!(matches!(c.decide(&facts), Decision::Session { route, found: Found::PathKey, .. } if route == peer(3)));
}
