-- The design meterd replaces in most SaaS apps: one usage row per
-- (customer, meter, month), upserted per event, and a limit check that reads it
-- and the customer's plan. Created (idempotently) by meterd-loadtest --target postgres.
CREATE TABLE IF NOT EXISTS plan_limits (
    plan          text   NOT NULL,
    meter         text   NOT NULL,
    monthly_limit bigint NOT NULL,
    PRIMARY KEY (plan, meter)
);
CREATE TABLE IF NOT EXISTS customers (
    id   text PRIMARY KEY,
    plan text NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    customer text   NOT NULL,
    meter    text   NOT NULL,
    month    date   NOT NULL,
    used     bigint NOT NULL,
    PRIMARY KEY (customer, meter, month)
);

CREATE OR REPLACE FUNCTION track_usage(c text, m text, amount bigint) RETURNS void AS $$
BEGIN
    INSERT INTO usage (customer, meter, month, used)
    VALUES (c, m, date_trunc('month', now())::date, amount)
    ON CONFLICT (customer, meter, month) DO UPDATE SET used = usage.used + EXCLUDED.used;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION can_use(c text, m text, amount bigint) RETURNS boolean AS $$
DECLARE
    lim  bigint;
    used_now bigint;
BEGIN
    SELECT pl.monthly_limit INTO lim
      FROM plan_limits pl
      JOIN customers cu ON cu.plan = pl.plan
     WHERE cu.id = c AND pl.meter = m;
    IF NOT FOUND THEN
        SELECT monthly_limit INTO lim FROM plan_limits WHERE plan = 'default' AND meter = m;
    END IF;
    SELECT u.used INTO used_now
      FROM usage u
     WHERE u.customer = c AND u.meter = m AND u.month = date_trunc('month', now())::date;
    RETURN coalesce(used_now, 0) + amount <= coalesce(lim, 0);
END
$$ LANGUAGE plpgsql;
