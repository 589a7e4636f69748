//! Plans, limits and per-customer entitlements, and the catalog that holds the
//! configured meters and plans.
//!
//! A limit spec arrives as JSON-shaped data (from TOML config or an entitlements
//! PUT): one object or an array of them. [`parse_limits`] turns it into [`Limit`]s
//! and names every bad field, so config validation and the HTTP API report the same
//! errors the same way.

use super::meter::{Meter, MeterId};
use super::quantity::{parse_decimal, Decimal};
use super::window::{BillingAnchor, WindowKind};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// How much of a window a limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAmount {
    Unlimited,
    /// Raw units (see [`super::quantity`]).
    Finite(i64),
    /// Credits (`limit = "credits"`): the customer's credit balance is the
    /// limit. In a plan `granted` is 0; a limit's state carries the granted
    /// amount of the active grants there (see `crate::credits`).
    Credits {
        granted: i64,
        low_balance: Option<i64>,
    },
}

impl LimitAmount {
    /// Whether this is a credits limit.
    pub fn is_credits(&self) -> bool {
        matches!(self, LimitAmount::Credits { .. })
    }
}

/// Where a limit is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// From local state, synced across instances in the background.
    Cached,
    /// Checked and consumed atomically in the shared store.
    Strict,
    /// Decided locally inside slices of the remaining quota taken from the
    /// shared store (issue 16): never overshoots, most decisions local.
    Leased,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Cached => "cached",
            Enforcement::Strict => "strict",
            Enforcement::Leased => "leased",
        }
    }
}

/// The largest count Redis scripts keep exact (Lua numbers are doubles, exact
/// to 2^53): with Redis, limits above it are refused (issue 16).
pub const REDIS_EXACT_MAX: i64 = (1 << 53) - 1;

/// One limit on one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The window counted; an unlimited limit given without one counts by month
    /// (for display: usage summaries still show the month's usage).
    pub window: WindowKind,
    pub amount: LimitAmount,
    /// A soft limit (`hard = false`) still allows, with `soft_limit_exceeded`.
    pub hard: bool,
    pub enforcement: Enforcement,
    /// Threshold notifications (issue 17): this limit's own percents
    /// (`notify = [...]`; empty silences it), or `None` for the default
    /// `notifications.thresholds`.
    pub notify: Option<super::thresholds::Thresholds>,
}

/// A problem in a limit spec: the field path below the spec, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub path: String,
    pub reason: String,
}

fn problem(path: impl Into<String>, reason: impl Into<String>) -> SpecProblem {
    SpecProblem { path: path.into(), reason: reason.into() }
}

/// Parses one meter's limit spec: `{limit, window, hard, enforcement}` or an array
/// of them. Paths in problems are relative (`""`, `"[1].window"`, `".limit"`).
pub fn parse_limits(spec: &Value, meter: &Meter) -> Result<Vec<Limit>, Vec<SpecProblem>> {
    let mut problems = Vec::new();
    let mut limits = Vec::new();
    match spec {
        Value::Array(items) => {
            if items.is_empty() {
                problems.push(problem("", "must list at least one limit"));
            }
            for (i, item) in items.iter().enumerate() {
                match parse_one(item, meter, &format!("[{i}]")) {
                    Ok(l) => limits.push(l),
                    Err(mut p) => problems.append(&mut p),
                }
            }
        }
        other => match parse_one(other, meter, "") {
            Ok(l) => limits.push(l),
            Err(mut p) => problems.append(&mut p),
        },
    }
    let windows: Vec<_> = limits.iter().map(|l| (l.window, l.amount.is_credits())).collect();
    for (i, w) in windows.iter().enumerate() {
        if windows[..i].contains(w) {
            let what = if w.1 { "two credits limits".to_string() } else { format!("two limits on the {} window", w.0) };
            problems.push(problem("", format!("has {what}")));
        }
    }
    if problems.is_empty() {
        Ok(limits)
    } else {
        Err(problems)
    }
}

fn parse_one(item: &Value, meter: &Meter, at: &str) -> Result<Limit, Vec<SpecProblem>> {
    let Value::Object(map) = item else {
        return Err(vec![problem(at, "must be an object like {limit = 100, window = \"month\"}")]);
    };
    let mut problems = Vec::new();
    for key in map.keys() {
        if !matches!(key.as_str(), "limit" | "window" | "hard" | "enforcement" | "low_balance" | "notify") {
            problems.push(problem(format!("{at}.{key}"), "unknown field (expected limit, window, hard, enforcement, low_balance, notify)"));
        }
    }
    // Credits: `limit = "credits"`, optional `low_balance` and `hard`, no window.
    if let Some(Value::String(s)) = map.get("limit") {
        if s == "credits" {
            return parse_credits(map, meter, at, problems);
        }
    }
    if map.contains_key("low_balance") {
        problems.push(problem(format!("{at}.low_balance"), "is only for limit = \"credits\""));
    }
    let amount = match map.get("limit") {
        None => {
            problems.push(problem(format!("{at}.limit"), "is required"));
            None
        }
        Some(v) => match parse_amount(v, meter) {
            Ok(a) => Some(a),
            Err(reason) => {
                problems.push(problem(format!("{at}.limit"), reason));
                None
            }
        },
    };
    let window = match map.get("window") {
        None => None,
        Some(Value::String(s)) => match s.parse::<WindowKind>() {
            Ok(w) => Some(w),
            Err(e) => {
                problems.push(problem(format!("{at}.window"), e.to_string()));
                None
            }
        },
        Some(_) => {
            problems.push(problem(format!("{at}.window"), "must be a string"));
            None
        }
    };
    if window.is_none() && !map.contains_key("window") && matches!(amount, Some(LimitAmount::Finite(_))) {
        problems.push(problem(format!("{at}.window"), "is required for a finite limit"));
    }
    let hard = match map.get("hard") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(problem(format!("{at}.hard"), "must be true or false"));
            true
        }
    };
    let enforcement = match map.get("enforcement").map(|v| v.as_str()) {
        None | Some(Some("cached")) => Enforcement::Cached,
        Some(Some("strict")) => Enforcement::Strict,
        Some(Some("leased")) => Enforcement::Leased,
        Some(_) => {
            problems.push(problem(format!("{at}.enforcement"), "must be \"cached\", \"strict\" or \"leased\""));
            Enforcement::Cached
        }
    };
    // Unique counts (issue 25): distinct values are decided from local sets
    // (synced across instances in the background), not by the Redis scripts.
    if meter.aggregation == super::meter::Aggregation::UniqueCount && enforcement != Enforcement::Cached {
        problems.push(problem(
            format!("{at}.enforcement"),
            "a unique_count meter's limits are \"cached\" (strict and leased take amounts, not values)",
        ));
    }
    // Threshold notifications (issue 17): the limit's own percents.
    let notify = match map.get("notify") {
        None => None,
        Some(v) => match super::thresholds::Thresholds::from_json(v) {
            Ok(t) => Some(t),
            Err(reason) => {
                problems.push(problem(format!("{at}.notify"), reason));
                None
            }
        },
    };
    match (problems.is_empty(), amount) {
        (true, Some(amount)) => Ok(Limit { window: window.unwrap_or(WindowKind::Month), amount, hard, enforcement, notify }),
        _ => Err(problems),
    }
}

/// A `limit = "credits"` spec: the balance of the customer's grants is the limit.
fn parse_credits(
    map: &serde_json::Map<String, Value>,
    meter: &Meter,
    at: &str,
    mut problems: Vec<SpecProblem>,
) -> Result<Limit, Vec<SpecProblem>> {
    if map.contains_key("window") {
        problems.push(problem(format!("{at}.window"), "a credits limit has no window (the balance never resets)"));
    }
    if map.contains_key("notify") {
        problems.push(problem(format!("{at}.notify"), "a credits limit notifies through low_balance (credits.low, credits.depleted)"));
    }
    if !matches!(meter.aggregation, super::meter::Aggregation::Sum | super::meter::Aggregation::Count) {
        problems.push(problem(format!("{at}.limit"), "credits need a sum or count meter"));
    }
    // With Redis a hard balance is never overdrawn whatever the enforcement:
    // `leased` (the default; "cached" means the same) decides inside slices of
    // the balance, `strict` takes every consume in Redis.
    let enforcement = match map.get("enforcement").map(|v| v.as_str()) {
        None | Some(Some("cached" | "leased")) => Enforcement::Leased,
        Some(Some("strict")) => Enforcement::Strict,
        Some(_) => {
            problems.push(problem(format!("{at}.enforcement"), "must be \"leased\" (the default) or \"strict\" for credits"));
            Enforcement::Leased
        }
    };
    let hard = match map.get("hard") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(problem(format!("{at}.hard"), "must be true or false"));
            true
        }
    };
    let low_balance = match map.get("low_balance") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match parse_decimal(&n.to_string(), meter.precision) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(problem(format!("{at}.low_balance"), e.to_string()));
                None
            }
        },
        Some(_) => {
            problems.push(problem(format!("{at}.low_balance"), "must be a number"));
            None
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Limit {
        window: WindowKind::Total,
        amount: LimitAmount::Credits { granted: 0, low_balance },
        hard,
        enforcement,
        // Credits notify through `low_balance` (credits.low / credits.depleted).
        notify: None,
    })
}

fn parse_amount(v: &Value, meter: &Meter) -> Result<LimitAmount, String> {
    match v {
        // `null` is how every answer shows an unlimited limit (checks, usage,
        // the entitlements view), so a view sent back as it was read is accepted.
        Value::Null => Ok(LimitAmount::Unlimited),
        Value::String(s) if s == "unlimited" => Ok(LimitAmount::Unlimited),
        Value::Number(n) => {
            let text = n.to_string();
            if text == "-1" || text == "-1.0" {
                return Ok(LimitAmount::Unlimited);
            }
            parse_decimal(&text, meter.precision)
                .map(LimitAmount::Finite)
                .map_err(|e| format!("{e} (use \"unlimited\", -1 or null for no limit)"))
        }
        _ => Err("must be a number, \"unlimited\", -1 or null".to_string()),
    }
}

/// Renders limits back to the JSON shape [`parse_limits`] reads, as every answer
/// shows them: an unlimited limit is `"limit": null` (as in checks), and has a
/// `window` only when one other than the default month was given (the month an
/// unlimited limit counts by when none is given is not shown as if it were one).
pub fn limits_to_json(limits: &[Limit], meter: &Meter) -> Value {
    let items: Vec<Value> = limits
        .iter()
        .map(|l| {
            let mut m = serde_json::Map::new();
            let amount = match l.amount {
                LimitAmount::Unlimited => Value::Null,
                LimitAmount::Finite(raw) => serde_json::to_value(Decimal { raw, precision: meter.precision }).unwrap_or(Value::Null),
                // Credits: the spec as given (no window; enforcement only when strict).
                LimitAmount::Credits { low_balance, .. } => {
                    m.insert("limit".into(), Value::String("credits".into()));
                    if let Some(raw) = low_balance {
                        let low = serde_json::to_value(Decimal { raw, precision: meter.precision }).unwrap_or(Value::Null);
                        m.insert("low_balance".into(), low);
                    }
                    m.insert("hard".into(), Value::Bool(l.hard));
                    if l.enforcement == Enforcement::Strict {
                        m.insert("enforcement".into(), Value::String("strict".into()));
                    }
                    return Value::Object(m);
                }
            };
            m.insert("limit".into(), amount);
            if l.amount != LimitAmount::Unlimited || l.window != WindowKind::Month {
                m.insert("window".into(), Value::String(l.window.as_str().into()));
            }
            m.insert("hard".into(), Value::Bool(l.hard));
            m.insert("enforcement".into(), Value::String(l.enforcement.as_str().into()));
            if let Some(t) = l.notify {
                m.insert("notify".into(), Value::Array(t.as_slice().iter().map(|&p| Value::from(p)).collect()));
            }
            Value::Object(m)
        })
        .collect();
    Value::Array(items)
}

/// A configured plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub name: String,
    pub features: BTreeMap<String, bool>,
    /// Limits per meter; a meter absent here is not entitled on this plan.
    pub limits: HashMap<MeterId, Arc<[Limit]>>,
}

/// Meters and plans from the config, indexed for lookups on the hot path.
///
/// The plans change live (config reload, `crate::reload`): they sit behind one
/// pointer swapped whole, so a reader sees either the old set or the new one.
///
/// Meters are added live but never changed or removed (issue 23): they sit in
/// a fixed-capacity, append-only table of [`METER_HEADROOM`] slots more than the
/// config had at start. A slot is written once, before the meter count that
/// makes it visible is raised, so a reader holds a plain `&Meter` for as long as
/// it holds the catalog and no lookup takes a lock.
#[derive(Debug)]
pub struct Catalog {
    /// The first `len` slots are set; the rest are free for meters added live.
    slots: Box<[OnceLock<Meter>]>,
    len: AtomicUsize,
    /// Names to ids, swapped whole when meters are added.
    meter_ids: arc_swap::ArcSwap<HashMap<String, MeterId>>,
    /// Serializes [`Catalog::add_meters`] (readers never take it).
    adding: Mutex<()>,
    plans: arc_swap::ArcSwap<PlanSet>,
}

/// How many meters a running process can add live beyond those it started with
/// (its counters, credit book and meter table are laid out for this many more).
pub const METER_HEADROOM: usize = 256;

/// The meters of a catalog at one moment: a slice-like view, in id order.
#[derive(Clone, Copy)]
pub struct Meters<'a>(&'a [OnceLock<Meter>]);

impl<'a> Meters<'a> {
    /// The meters in id order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &'a Meter> + Clone + 'a {
        self.0.iter().filter_map(OnceLock::get)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The meter at index (= id) `i`.
    pub fn get(&self, i: usize) -> Option<&'a Meter> {
        self.0.get(i).and_then(OnceLock::get)
    }

    pub fn to_vec(&self) -> Vec<Meter> {
        self.iter().cloned().collect()
    }
}

impl<'a> IntoIterator for Meters<'a> {
    type Item = &'a Meter;
    type IntoIter = std::iter::FilterMap<std::slice::Iter<'a, OnceLock<Meter>>, fn(&'a OnceLock<Meter>) -> Option<&'a Meter>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().filter_map(OnceLock::get)
    }
}

impl std::ops::Index<usize> for Meters<'_> {
    type Output = Meter;
    fn index(&self, i: usize) -> &Meter {
        match self.0[i].get() {
            Some(m) => m,
            None => panic!("meter slot {i} is not set"),
        }
    }
}

impl PartialEq for Meters<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for Meters<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The plans, indexed by name, and the default plan: swapped together.
#[derive(Debug)]
pub struct PlanSet {
    plans: Vec<Arc<Plan>>,
    plan_ids: HashMap<String, usize>,
    default_plan: Arc<Plan>,
}

impl PlanSet {
    fn new(plans: Vec<Plan>, default_plan: usize) -> PlanSet {
        let plan_ids = plans.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        let plans: Vec<Arc<Plan>> = plans.into_iter().map(Arc::new).collect();
        let default_plan = plans
            .get(default_plan)
            .or_else(|| plans.first())
            .cloned()
            .unwrap_or_else(|| Arc::new(Plan { name: "default".into(), features: BTreeMap::new(), limits: HashMap::new() }));
        PlanSet { plans, plan_ids, default_plan }
    }
}

/// A snapshot of the plans (see [`Catalog::plans`]): a slice, or iterated by value.
pub struct Plans(Arc<PlanSet>);

impl std::ops::Deref for Plans {
    type Target = [Arc<Plan>];
    fn deref(&self) -> &[Arc<Plan>] {
        &self.0.plans
    }
}

impl IntoIterator for Plans {
    type Item = Arc<Plan>;
    type IntoIter = std::vec::IntoIter<Arc<Plan>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.plans.clone().into_iter()
    }
}

impl Catalog {
    /// Builds the catalog. Config validation guarantees `plans[default_plan]`
    /// exists; should it not, the first plan (or an empty plan entitling nothing)
    /// is the default rather than a panic. `meters[i].id` must be `i`.
    pub fn new(meters: Vec<Meter>, plans: Vec<Plan>, default_plan: usize) -> Catalog {
        let meter_ids = meters.iter().map(|m| (m.name.clone(), m.id)).collect();
        let capacity = (meters.len() + METER_HEADROOM).min(usize::from(MeterId::MAX) + 1).max(meters.len());
        let len = meters.len();
        let mut slots: Vec<OnceLock<Meter>> = meters.into_iter().map(OnceLock::from).collect();
        slots.resize_with(capacity, OnceLock::new);
        Catalog {
            slots: slots.into_boxed_slice(),
            len: AtomicUsize::new(len),
            meter_ids: arc_swap::ArcSwap::from_pointee(meter_ids),
            adding: Mutex::new(()),
            plans: arc_swap::ArcSwap::from_pointee(PlanSet::new(plans, default_plan)),
        }
    }

    /// The meters now configured, in id order.
    pub fn meters(&self) -> Meters<'_> {
        let len = self.len.load(Ordering::Acquire);
        Meters(&self.slots[..len])
    }

    /// How many meters this catalog can hold: those at start plus [`METER_HEADROOM`].
    /// Tables indexed by meter id are laid out for this many.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn meter(&self, id: MeterId) -> Option<&Meter> {
        // A slot is set only just before the count covers it: no need to read it.
        self.slots.get(usize::from(id)).and_then(OnceLock::get)
    }

    pub fn meter_by_name(&self, name: &str) -> Option<&Meter> {
        // A handful of meters is the common case: comparing names beats hashing.
        let meters = self.meters();
        if meters.len() <= 16 {
            return meters.iter().find(|m| m.name == name);
        }
        let id = self.meter_ids.load().get(name).copied()?;
        self.meter(id)
    }

    // Meters added live (config reload, issue 23).
    /// Appends `added` (ids `len..`, in order, names not configured yet) to the
    /// meter table: each slot is set before the count that makes it visible.
    /// Refused (nothing added) when the ids are not the next ones or the table
    /// is full.
    pub fn add_meters(&self, added: &[Meter]) -> Result<(), String> {
        let _one = self.adding.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let len = self.len.load(Ordering::Acquire);
        if len + added.len() > self.slots.len() {
            return Err(format!(
                "at most {} meters fit this process ({} configured, {} more requested); restart",
                self.slots.len(),
                len,
                added.len()
            ));
        }
        for (i, m) in added.iter().enumerate() {
            if usize::from(m.id) != len + i || self.meter_ids.load().contains_key(&m.name) {
                return Err(format!("meter {:?} does not take the next id {} or is configured already", m.name, len + i));
            }
        }
        let mut ids = HashMap::clone(&self.meter_ids.load());
        for m in added {
            // Every slot at or above `len` is unset (only this lock sets them).
            let _ = self.slots[usize::from(m.id)].set(m.clone());
            ids.insert(m.name.clone(), m.id);
        }
        self.meter_ids.store(Arc::new(ids));
        self.len.store(len + added.len(), Ordering::Release);
        Ok(())
    }

    /// This catalog (built from a reloaded config) with its meters numbered as
    /// in `running`: a meter `running` has keeps its id there, a new meter takes
    /// the next free id in config order, and the plans' limits follow. Meter
    /// ids are positions in `[[meters]]` at start; a new meter listed between
    /// existing ones must not move them. When a meter of `running` is missing
    /// (a removal, refused by the reload), the catalog is returned as it is.
    pub fn numbered_as(&self, running: &Catalog) -> Catalog {
        let (mine, theirs) = (self.meters(), running.meters());
        if theirs.iter().any(|m| self.meter_by_name(&m.name).is_none()) {
            return self.clone_whole();
        }
        let mut next = theirs.len();
        let mut ids: HashMap<MeterId, MeterId> = HashMap::new();
        let mut meters: Vec<Meter> = Vec::with_capacity(mine.len());
        for m in mine.iter() {
            let id = match running.meter_by_name(&m.name) {
                Some(r) => r.id,
                None => {
                    next += 1;
                    // At most u16::MAX meters validate, so this fits.
                    MeterId::try_from(next - 1).unwrap_or(MeterId::MAX)
                }
            };
            ids.insert(m.id, id);
            meters.push(Meter { id, ..m.clone() });
        }
        meters.sort_by_key(|m| m.id);
        let set = self.plans.load();
        let renumber = |p: &Plan| Plan {
            name: p.name.clone(),
            features: p.features.clone(),
            limits: p.limits.iter().map(|(m, l)| (ids.get(m).copied().unwrap_or(*m), l.clone())).collect(),
        };
        let plans: Vec<Plan> = set.plans.iter().map(|p| renumber(p)).collect();
        let default_plan = set.plan_ids.get(&set.default_plan.name).copied().unwrap_or(0);
        Catalog::new(meters, plans, default_plan)
    }

    /// A copy with the same meters and plans.
    fn clone_whole(&self) -> Catalog {
        let set = self.plans.load();
        let plans: Vec<Plan> = set.plans.iter().map(|p| Plan::clone(p)).collect();
        let default_plan = set.plan_ids.get(&set.default_plan.name).copied().unwrap_or(0);
        Catalog::new(self.meters().to_vec(), plans, default_plan)
    }

    pub fn plan(&self, name: &str) -> Option<Arc<Plan>> {
        let set = self.plans.load();
        set.plan_ids.get(name).and_then(|&i| set.plans.get(i)).cloned()
    }

    /// The plans now configured.
    pub fn plans(&self) -> Plans {
        Plans(self.plans.load_full())
    }

    pub fn default_plan(&self) -> Arc<Plan> {
        self.plans.load().default_plan.clone()
    }

    // Live plan changes (config reload, issue 23).
    /// Installs the plans (and default plan) of `other`, a catalog built from a
    /// reloaded config whose meters are numbered as here ([`Catalog::numbered_as`])
    /// and already added ([`Catalog::add_meters`]): one swap.
    pub fn replace_plans(&self, other: &Catalog) {
        self.plans.store(other.plans.load_full());
    }
}

/// What a PUT stores for one customer: the plan, per-meter overrides, feature
/// flags, Stripe customer id and billing anchor. Kept as this document in the store
/// so an application may also write it directly.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default)]
    pub overrides: BTreeMap<String, Value>,
    #[serde(default)]
    pub features: BTreeMap<String, bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_anchor: Option<String>,
}

/// A customer's entitlements resolved against the catalog: what checks read.
#[derive(Debug, Clone)]
pub struct Entitlements {
    pub plan: Arc<Plan>,
    pub overrides: HashMap<MeterId, Arc<[Limit]>>,
    /// The plan's features with the customer's flags laid over them.
    pub features: BTreeMap<String, bool>,
    pub stripe_customer_id: Option<String>,
    pub billing_anchor: BillingAnchor,
    pub billing_anchor_ms: Option<i64>,
}

impl Entitlements {
    /// The default plan with nothing customer-specific.
    pub fn default_for(catalog: &Catalog) -> Entitlements {
        let plan = catalog.default_plan();
        Entitlements {
            features: plan.features.clone(),
            plan,
            overrides: HashMap::new(),
            stripe_customer_id: None,
            billing_anchor: BillingAnchor::default(),
            billing_anchor_ms: None,
        }
    }

    /// The limits on `meter`: the override if any, else the plan's; `None` when the
    /// meter is not entitled.
    pub fn limits(&self, meter: MeterId) -> Option<&Arc<[Limit]>> {
        self.overrides.get(&meter).or_else(|| self.plan.limits.get(&meter))
    }

    /// Resolves a stored document. Problems name the field (`plan`,
    /// `overrides.interviews[0].window`, ...).
    pub fn resolve(doc: &EntitlementsDoc, catalog: &Catalog) -> Result<Entitlements, Vec<SpecProblem>> {
        let mut problems = Vec::new();
        let plan = match &doc.plan {
            None => Some(catalog.default_plan()),
            Some(name) => match catalog.plan(name) {
                Some(p) => Some(p),
                None => {
                    problems.push(problem("plan", format!("unknown plan {name:?}")));
                    None
                }
            },
        };
        let mut overrides = HashMap::new();
        for (name, spec) in &doc.overrides {
            let Some(meter) = catalog.meter_by_name(name) else {
                problems.push(problem(format!("overrides.{name}"), format!("unknown meter {name:?}")));
                continue;
            };
            match parse_limits(spec, meter) {
                Ok(limits) => {
                    overrides.insert(meter.id, Arc::from(limits));
                }
                Err(ps) => {
                    problems.extend(ps.into_iter().map(|p| SpecProblem { path: format!("overrides.{name}{}", p.path), reason: p.reason }))
                }
            }
        }
        let billing_anchor_ms = match &doc.billing_anchor {
            None => None,
            Some(text) => match super::window::parse_rfc3339(text) {
                Some(ms) => Some(ms),
                None => {
                    problems.push(problem("billing_anchor", "must be an RFC 3339 timestamp"));
                    None
                }
            },
        };
        if let Some(id) = &doc.stripe_customer_id {
            if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
                problems.push(problem("stripe_customer_id", "must be 1-255 characters without control characters"));
            }
        }
        for key in doc.features.keys() {
            if key.is_empty() || key.len() > 64 {
                problems.push(problem(format!("features.{key}"), "feature names are 1-64 bytes"));
            }
        }
        let Some(plan) = plan else {
            return Err(problems);
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut features = plan.features.clone();
        features.extend(doc.features.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(Entitlements {
            plan,
            overrides,
            features,
            stripe_customer_id: doc.stripe_customer_id.clone(),
            billing_anchor: billing_anchor_ms.map(BillingAnchor::from_ms).unwrap_or_default(),
            billing_anchor_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meter::Aggregation;
    use serde_json::json;

    fn meter(precision: u8) -> Meter {
        Meter {
            id: 0,
            name: "m".into(),
            aggregation: Aggregation::Sum,
            precision,
            stripe_event_name: None,
            unique_property: None,
            group_by: Vec::new(),
        }
    }

    #[test]
    fn parses_single_and_multiple_limits() {
        let one = parse_limits(&json!({"limit": 300, "window": "month"}), &meter(0));
        assert_eq!(
            one,
            Ok(vec![Limit {
                window: WindowKind::Month,
                amount: LimitAmount::Finite(300),
                hard: true,
                enforcement: Enforcement::Cached,
                notify: None
            }])
        );
        let two = parse_limits(&json!([{"limit": 5, "window": "month"}, {"limit": 2.5, "window": "day", "hard": false}]), &meter(1));
        let two = two.unwrap_or_default();
        assert_eq!(two.len(), 2);
        assert_eq!(two[1].amount, LimitAmount::Finite(25));
        assert!(!two[1].hard);
    }

    /// Credits are leased by default (issue 16), `strict` on request; the
    /// rendered spec reads back the same; other enforcements are refused.
    #[test]
    fn credits_enforcement_is_leased_unless_strict() {
        let m = meter(0);
        let of = |spec: serde_json::Value| parse_limits(&spec, &m).map(|l| l[0].enforcement);
        assert_eq!(of(json!({"limit": "credits"})), Ok(Enforcement::Leased));
        assert_eq!(of(json!({"limit": "credits", "enforcement": "cached"})), Ok(Enforcement::Leased));
        assert_eq!(of(json!({"limit": "credits", "enforcement": "strict"})), Ok(Enforcement::Strict));
        let bad = parse_limits(&json!({"limit": "credits", "enforcement": "eventual"}), &m);
        assert_eq!(bad.err().unwrap_or_default().first().map(|p| p.path.clone()), Some(".enforcement".to_string()));
        for spec in [json!({"limit": "credits"}), json!({"limit": "credits", "enforcement": "strict"})] {
            let limits = parse_limits(&spec, &m).unwrap_or_default();
            assert_eq!(parse_limits(&limits_to_json(&limits, &m), &m), Ok(limits), "{spec}");
        }
    }

    #[test]
    fn unlimited_spellings() {
        for spec in [json!({"limit": "unlimited"}), json!({"limit": -1}), json!({"limit": -1, "window": "month"}), json!({"limit": null})] {
            let limits = parse_limits(&spec, &meter(0)).unwrap_or_default();
            assert_eq!(limits.first().map(|l| l.amount), Some(LimitAmount::Unlimited), "{spec}");
        }
    }

    #[test]
    fn names_every_bad_field() {
        let err = parse_limits(&json!([{"limit": -5, "window": "week"}, {"limit": 1, "colour": "red"}, {"limit": 3}]), &meter(0));
        let paths: Vec<String> = err.err().unwrap_or_default().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, vec!["[0].limit", "[0].window", "[1].colour", "[1].window", "[2].window"]);
        let dup = parse_limits(&json!([{"limit": 1, "window": "day"}, {"limit": 2, "window": "day"}]), &meter(0));
        assert!(dup.is_err());
    }

    #[test]
    fn unlimited_renders_as_null_without_an_invented_window() {
        let m = meter(0);
        let given = json!([{"limit": "unlimited"}, {"limit": -1, "window": "day"}, {"limit": 5, "window": "hour", "hard": false}]);
        let limits = parse_limits(&given, &m).unwrap_or_default();
        let shown = limits_to_json(&limits, &m);
        assert_eq!(
            shown,
            json!([
                {"limit": null, "hard": true, "enforcement": "cached"},
                {"limit": null, "window": "day", "hard": true, "enforcement": "cached"},
                {"limit": 5, "window": "hour", "hard": false, "enforcement": "cached"},
            ])
        );
        // What is shown reads back as the same limits.
        assert_eq!(parse_limits(&shown, &m), Ok(limits));
    }

    #[test]
    fn a_null_limit_needs_no_window_and_other_types_are_named() {
        assert!(parse_limits(&json!({"limit": null}), &meter(0)).is_ok());
        let err = parse_limits(&json!({"limit": true, "window": "day"}), &meter(0)).err().unwrap_or_default();
        assert_eq!(err, vec![problem(".limit", "must be a number, \"unlimited\", -1 or null")]);
    }
}

// Meters added live (config reload, issue 23).
#[cfg(test)]
mod live_meters {
    use super::*;
    use crate::model::meter::Aggregation;

    fn meter(id: MeterId, name: &str) -> Meter {
        Meter {
            id,
            name: name.into(),
            aggregation: Aggregation::Sum,
            precision: 0,
            stripe_event_name: None,
            unique_property: None,
            group_by: Vec::new(),
        }
    }

    fn limit() -> Arc<[Limit]> {
        Arc::from(vec![Limit {
            window: WindowKind::Day,
            amount: LimitAmount::Finite(5),
            hard: true,
            enforcement: Enforcement::Cached,
            notify: None,
        }])
    }

    fn plan(limits: &[MeterId]) -> Plan {
        Plan { name: "p".into(), features: BTreeMap::new(), limits: limits.iter().map(|&m| (m, limit())).collect() }
    }

    #[test]
    fn a_new_meter_listed_first_keeps_the_running_ids_and_its_limits_follow() {
        let running = Catalog::new(vec![meter(0, "a"), meter(1, "b")], vec![plan(&[1])], 0);
        // The reloaded config lists the new meter `c` first: ids 0, 1, 2 by position.
        let reloaded = Catalog::new(vec![meter(0, "c"), meter(1, "a"), meter(2, "b")], vec![plan(&[0, 2])], 0);
        let numbered = reloaded.numbered_as(&running);
        let ids: Vec<(MeterId, &str)> = numbered.meters().iter().map(|m| (m.id, m.name.as_str())).collect();
        assert_eq!(ids, vec![(0, "a"), (1, "b"), (2, "c")]);
        let mut limited: Vec<MeterId> = numbered.default_plan().limits.keys().copied().collect();
        limited.sort_unstable();
        assert_eq!(limited, vec![1, 2], "b's limit stays on b (1), c's moves to c (2)");
        // Added to the running catalog, the meter is found by name and id.
        assert!(running.meter_by_name("c").is_none());
        let added: Vec<Meter> = numbered.meters().iter().filter(|m| m.id >= 2).cloned().collect();
        running.add_meters(&added).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(running.meter_by_name("c").map(|m| m.id), Some(2));
        assert_eq!(running.meter(2).map(|m| m.name.as_str()), Some("c"));
        assert_eq!(running.meters(), numbered.meters());
        // Adding it again, or with an id out of order, is refused.
        assert!(running.add_meters(&added).is_err());
        assert!(running.add_meters(&[meter(5, "d")]).is_err());
    }

    #[test]
    fn the_table_has_fixed_room_and_name_lookups_past_sixteen_meters_use_the_index() {
        let many: Vec<Meter> = (0..20).map(|i| meter(i, &format!("m{i}"))).collect();
        let running = Catalog::new(many, vec![plan(&[])], 0);
        assert_eq!(running.capacity(), 20 + METER_HEADROOM);
        let extra: Vec<Meter> = (20..20 + METER_HEADROOM as MeterId).map(|i| meter(i, &format!("m{i}"))).collect();
        running.add_meters(&extra).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(running.meter_by_name("m275").map(|m| m.id), Some(275));
        let err = running.add_meters(&[meter(276, "full")]).err().unwrap_or_default();
        assert!(err.contains("restart"), "{err}");
        assert!(running.meter_by_name("full").is_none());
    }

    #[test]
    fn a_removed_meter_leaves_the_reloaded_catalog_as_it_is() {
        let running = Catalog::new(vec![meter(0, "a"), meter(1, "b")], vec![plan(&[1])], 0);
        let reloaded = Catalog::new(vec![meter(0, "b")], vec![plan(&[0])], 0);
        let numbered = reloaded.numbered_as(&running);
        assert_eq!(numbered.meters(), reloaded.meters());
    }
}
