//! Weighted fair sharing between the tenants of one model: stride scheduling over the claim.
//!
//! Each (model, tenant) has a *pass* in `fair_shares` (migration 0019), and the model has a
//! virtual time (the row whose tenant is [`CLOCK_ROW`]): the pass at which the last task was
//! picked. A claim of N slots picks, N times, the tenant with the smallest pass among those with
//! a due pending task, takes that tenant's next task (by `priority DESC, id`, as before) and
//! advances its pass by `STRIDE / weight`. A tenant's pass is first raised to the virtual time,
//! so a tenant that was idle (or whose tasks waited out a backoff) cannot bank credit and then
//! take every slot when it comes back. Ties go to the smaller tenant id.
//!
//! Finding the tenants: a loose index scan of `tasks_ready (model, tenant_id, priority DESC, id)`
//! (one seek per tenant with pending tasks), no table scan. With one tenant pending (the usual
//! case) the claim is the plain per-tenant claim and nothing is written here: passes only matter
//! between tenants that compete, and a tenant alone uses idle capacity without owing it later.
//! No lock of its own: SQLite has one writer, and PostgreSQL's per-model advisory lock already
//! serialises a model's claims across nodes, so the passes are read and written under it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::rows::{not_expired, Dialect};
use crate::domain::Transition;

/// What a pick costs a tenant of weight 1; a tenant of weight w pays `STRIDE / w`. Large enough
/// that integer division loses nothing that matters for weights up to [`MAX_WEIGHT`].
pub const STRIDE: i64 = 1 << 20;

/// The largest weight the configuration takes.
pub const MAX_WEIGHT: u32 = 1000;

/// The `tenant_id` of a model's virtual-time row in `fair_shares` (no tenant id is empty).
pub const CLOCK_ROW: &str = "";

/// Fair-share weights by tenant name, from the config's `[tenants.NAME]` tables; a tenant not
/// named weighs 1. By name, not id: a tenant created after the start gets its weight at once.
#[derive(Debug, Clone, Default)]
pub struct TenantWeights(Arc<HashMap<String, u32>>);

impl TenantWeights {
    pub fn new(weights: HashMap<String, u32>) -> Self {
        TenantWeights(Arc::new(weights))
    }

    /// The largest weight configured (1 when none is).
    pub fn heaviest(&self) -> u32 {
        self.0
            .values()
            .copied()
            .max()
            .unwrap_or(1)
            .clamp(1, MAX_WEIGHT)
    }

    pub fn weight(&self, tenant_name: Option<&str>) -> u32 {
        tenant_name
            .and_then(|n| self.0.get(n).copied())
            .unwrap_or(1)
            .clamp(1, MAX_WEIGHT)
    }
}

/// A store's current weights: set once at start, read by every claim that chooses.
#[derive(Debug, Default)]
pub struct WeightCell(RwLock<TenantWeights>);

impl WeightCell {
    pub fn set(&self, weights: TenantWeights) {
        // A poisoned lock still holds a whole value (a clone of an Arc was being written).
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = weights;
    }

    pub fn get(&self) -> TenantWeights {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One tenant with pending tasks of the model, as [`tenants_sql`] reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Share {
    pub tenant_id: String,
    /// `None` when the tenant row is gone (its weight is then 1).
    pub name: Option<String>,
    /// `None` before the tenant first competed for this model.
    pub pass: Option<i64>,
    /// Its due, unexpired pending tasks, counted up to the claim's room.
    pub due: i64,
    /// The model's virtual time (the same on every row).
    pub clock: Option<i64>,
    /// Tasks of the model running now (the same on every row).
    pub running: i64,
}

impl Share {
    /// The row as the SQLite writer thread's rusqlite connection returns it.
    pub fn from_sqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Share {
            tenant_id: r.get(0)?,
            name: r.get(1)?,
            pass: r.get(2)?,
            due: r.get(3)?,
            clock: r.get(4)?,
            running: r.get(5)?,
        })
    }
}

/// The tenants with pending tasks of model `p(1)`, in tenant id order: a loose index scan of
/// `tasks_ready`, each step one seek for the next tenant id. Per tenant: its name (for its
/// weight), its pass, and its due tasks counted up to the claim's room (the model's `p(3)` limit
/// and `p(4)` concurrency less what runs), each count a walk of that tenant's range. `p(2)` is
/// the claim's time.
pub fn tenants_sql(dialect: Dialect, p: impl Fn(u32) -> String) -> String {
    let (model, now, limit, max_running) = (p(1), p(2), p(3), p(4));
    let pending = Transition::Claim.guard();
    let running =
        format!("(SELECT count(*) FROM tasks WHERE model = {model} AND state = 'processing')");
    let room = match dialect {
        Dialect::Sqlite => format!("max(0, min({limit}, {max_running} - {running}))"),
        Dialect::Postgres => format!("GREATEST(0, LEAST({limit}, {max_running} - {running}))"),
    };
    format!(
        "{cte} \
         SELECT t.tenant AS tenant_id, n.name AS name, f.pass AS pass, \
                (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE model = {model} \
                   AND tenant_id = t.tenant AND {pending} AND run_after <= {now} AND {live} \
                   LIMIT {room}) d) AS due, \
                (SELECT pass FROM fair_shares WHERE model = {model} AND tenant_id = '{CLOCK_ROW}') \
                  AS clock, \
                {running} AS running \
         FROM t LEFT JOIN tenants n ON n.id = t.tenant \
                LEFT JOIN fair_shares f ON f.model = {model} AND f.tenant_id = t.tenant \
         WHERE t.tenant IS NOT NULL ORDER BY t.tenant",
        cte = pending_tenants(&model),
        live = not_expired(&now),
    )
}

/// `t(tenant)`: the tenants with pending tasks of `model`, by a loose index scan of
/// `tasks_ready` (each step one seek for the next tenant id; the last row is NULL).
fn pending_tenants(model: &str) -> String {
    let pending = Transition::Claim.guard();
    format!(
        "WITH RECURSIVE t(tenant) AS ( \
           SELECT (SELECT tenant_id FROM tasks WHERE model = {model} AND {pending} \
                   ORDER BY tenant_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT tenant_id FROM tasks WHERE model = {model} AND {pending} \
                   AND tenant_id > t.tenant ORDER BY tenant_id LIMIT 1) \
           FROM t WHERE t.tenant IS NOT NULL)"
    )
}

/// The other tenants with pending tasks of model `p(1)` than tenant `p(2)`: each one's name and
/// its pending tasks (due or not, as a queue position counts them) counted up to `p(3)`.
pub fn other_queues_sql(p: impl Fn(u32) -> String) -> String {
    let (model, me, cap) = (p(1), p(2), p(3));
    format!(
        "{cte} \
         SELECT n.name, (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE model = {model} \
                   AND tenant_id = t.tenant AND state = 'pending' LIMIT {cap}) d) \
         FROM t LEFT JOIN tenants n ON n.id = t.tenant \
         WHERE t.tenant IS NOT NULL AND t.tenant <> {me}",
        cte = pending_tenants(&model),
    )
}

/// A pending task's estimated queue position: `ahead` tasks before it in its own tenant's
/// queue, plus what each other tenant with pending tasks starts meanwhile at its weight's pace
/// (`ceil(ahead × its weight / ours)`, at most what it has waiting), capped at
/// `MAX_QUEUE_POSITION`. An estimate: it assumes the queues as they are now.
pub fn queue_estimate(
    ahead: i64,
    my_weight: u32,
    others: &[(Option<String>, i64)],
    weights: &TenantWeights,
) -> u64 {
    let cap = taskgate_proto::MAX_QUEUE_POSITION;
    let ahead = u64::try_from(ahead).unwrap_or(0);
    let mine = u64::from(my_weight.max(1));
    let mut total = ahead;
    for (name, waiting) in others {
        let pace = u64::from(weights.weight(name.as_deref()));
        let meanwhile = (ahead * pace).div_ceil(mine);
        total = total.saturating_add(meanwhile.min(u64::try_from(*waiting).unwrap_or(0)));
        if total >= cap {
            break;
        }
    }
    total.min(cap)
}

/// How far [`other_queues_sql`] counts each other tenant for a task with `ahead` before it:
/// no tenant can start more than the heaviest weight's pace allows, nor more than the cap.
pub fn other_queue_cap(ahead: i64, my_weight: u32, weights: &TenantWeights) -> i64 {
    let heaviest = i64::from(weights.heaviest());
    let cap = i64::try_from(taskgate_proto::MAX_QUEUE_POSITION).unwrap_or(i64::MAX);
    (ahead.saturating_mul(heaviest) / i64::from(my_weight.max(1)) + 1).min(cap)
}

/// What one claim takes from whom, and the passes it leaves.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `(tenant id, tasks to claim)`, tenants in id order, only those that get any.
    pub take: Vec<(String, usize)>,
    /// `(tenant id, pass)` to write: the tenants that got tasks, then the model's clock row.
    /// Empty when the claim did not choose between tenants.
    pub passes: Vec<(String, i64)>,
}

/// The claim's choice. `room` is how many tasks it may start. With one tenant pending, that
/// tenant takes the room and no pass is written (the fast path).
pub fn plan(shares: &[Share], weights: &TenantWeights, room: usize) -> Plan {
    if shares.len() == 1 {
        return Plan {
            take: vec![(shares[0].tenant_id.clone(), room)],
            passes: Vec::new(),
        };
    }
    let clock = shares.iter().find_map(|s| s.clock).unwrap_or(0);
    // (pass, stride, due left, taken)
    let mut state: Vec<(i64, i64, usize, usize)> = shares
        .iter()
        .map(|s| {
            let stride = STRIDE / i64::from(weights.weight(s.name.as_deref()));
            let due = usize::try_from(s.due).unwrap_or(0);
            (s.pass.unwrap_or(clock).max(clock), stride, due, 0)
        })
        .collect();
    let mut now = clock;
    for _ in 0..room {
        // `min_by_key` keeps the first of equals: ties go to the smaller tenant id.
        let Some(i) = (0..state.len())
            .filter(|&i| state[i].2 > 0)
            .min_by_key(|&i| state[i].0)
        else {
            break;
        };
        let s = &mut state[i];
        now = now.max(s.0);
        s.0 = s.0.saturating_add(s.1);
        s.2 -= 1;
        s.3 += 1;
    }
    let mut plan = Plan::default();
    for (share, (pass, _, _, taken)) in shares.iter().zip(&state) {
        if *taken > 0 {
            plan.take.push((share.tenant_id.clone(), *taken));
            plan.passes.push((share.tenant_id.clone(), *pass));
        }
    }
    if !plan.passes.is_empty() {
        plan.passes.push((CLOCK_ROW.to_owned(), now));
    }
    plan
}

/// Writes `rows` `(tenant, pass)` of `model` (placeholders: `p(1)` the model, then a tenant
/// and a pass per row).
pub fn passes_sql(rows: usize, p: impl Fn(u32) -> String) -> String {
    let values: Vec<String> = (0..rows as u32)
        .map(|i| format!("({}, {}, {})", p(1), p(2 + 2 * i), p(3 + 2 * i)))
        .collect();
    format!(
        "INSERT INTO fair_shares (model, tenant_id, pass) VALUES {} \
         ON CONFLICT (model, tenant_id) DO UPDATE SET pass = excluded.pass",
        values.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(id: &str, pass: Option<i64>, due: i64, clock: Option<i64>) -> Share {
        Share {
            tenant_id: id.into(),
            name: Some(id.into()),
            pass,
            due,
            clock,
            running: 0,
        }
    }

    fn order(shares: &mut [Share], weights: &TenantWeights, n: usize) -> Vec<String> {
        // One slot per claim, the passes carried from one claim to the next as the store does.
        let mut picked = Vec::new();
        for _ in 0..n {
            let p = plan(shares, weights, 1);
            let Some((who, _)) = p.take.first() else {
                break;
            };
            picked.push(who.clone());
            for (t, pass) in &p.passes {
                for s in shares.iter_mut() {
                    if t == CLOCK_ROW {
                        s.clock = Some(*pass);
                    } else if &s.tenant_id == t {
                        s.pass = Some(*pass);
                    }
                }
            }
        }
        picked
    }

    #[test]
    fn weights_three_to_one_interleave_three_to_one() {
        let weights = TenantWeights::new(HashMap::from([("a".to_owned(), 3)]));
        let mut shares = vec![share("a", None, 100, None), share("b", None, 100, None)];
        let picked = order(&mut shares, &weights, 16);
        let a = picked.iter().filter(|t| *t == "a").count();
        assert_eq!(a, 12, "{picked:?}");
        // Never more than three of a's in a row.
        assert!(
            !picked.windows(4).any(|w| w.iter().all(|t| t == "a")),
            "{picked:?}"
        );
    }

    #[test]
    fn an_idle_tenant_does_not_bank_credit() {
        // b was idle while a's pass and the clock moved far ahead: b comes back at the clock.
        let weights = TenantWeights::default();
        let mut shares = vec![
            share("a", Some(1000 * STRIDE), 100, Some(999 * STRIDE)),
            share("b", Some(0), 100, Some(999 * STRIDE)),
        ];
        let picked = order(&mut shares, &weights, 6);
        assert_eq!(picked, ["b", "a", "b", "a", "b", "a"]);
    }

    #[test]
    fn a_queue_position_counts_the_other_tenants_at_their_pace() {
        let weights = TenantWeights::new(HashMap::from([("heavy".to_owned(), 3)]));
        // Five ahead in our queue: an equal tenant with 100 waiting starts five meanwhile, a
        // tenant of weight 3 fifteen, a tenant with two waiting two.
        let others = [
            (Some("b".to_owned()), 100),
            (Some("heavy".to_owned()), 100),
            (None, 2),
        ];
        assert_eq!(queue_estimate(5, 1, &others, &weights), 5 + 5 + 15 + 2);
        assert_eq!(queue_estimate(0, 1, &others, &weights), 0);
        assert_eq!(other_queue_cap(5, 1, &weights), 16);
    }

    #[test]
    fn one_claim_of_many_slots_shares_them_and_a_tenant_alone_writes_nothing() {
        let weights = TenantWeights::default();
        let p = plan(
            &[share("a", None, 100, None), share("b", None, 2, None)],
            &weights,
            8,
        );
        assert_eq!(p.take, [("a".to_owned(), 6), ("b".to_owned(), 2)]);
        assert_eq!(p.passes.len(), 3);
        let alone = plan(&[share("a", None, 100, None)], &weights, 8);
        assert_eq!(alone.take, [("a".to_owned(), 8)]);
        assert!(alone.passes.is_empty());
    }
}
