-- DIV's charge ledger in PostgreSQL: the same records as the embedded sled ledger, shared by
-- every replica of one host. `{schema}` is the ledger's schema (one per payment chain).
--
-- Invariants the database itself enforces, whatever a replica does:
--   * a permit's charged total never passes its signed maximum (CHECK);
--   * no cumulative request number is issued twice for a permit (UNIQUE on the journal);
--   * a user's unsettled charges in one stablecoin never pass the limit the charging replica
--     read from the chain (the `unsettled` row is updated under its row lock, see `charge`).

CREATE TABLE {schema}.meta (
    k text PRIMARY KEY,
    v bytea NOT NULL
);

CREATE SEQUENCE {schema}.versions;

CREATE TABLE {schema}.permits (
    hash bytea PRIMARY KEY,
    user_addr bytea NOT NULL,
    token bytea NOT NULL,
    model_id bytea NOT NULL,
    max_amount numeric(78, 0) NOT NULL,
    -- the PermitAccount as first recorded: the permit, its signature, the model's name
    account jsonb NOT NULL,
    charged_amount numeric(78, 0) NOT NULL DEFAULT 0,
    charged_requests bigint NOT NULL DEFAULT 0,
    settled_amount numeric(78, 0) NOT NULL DEFAULT 0,
    settled_requests bigint NOT NULL DEFAULT 0,
    rejected smallint,
    keyed boolean NOT NULL DEFAULT false,
    -- bumped on every change: replicas read what changed since the version they last saw
    version bigint NOT NULL DEFAULT nextval('{schema}.versions'),
    CHECK (charged_amount <= max_amount)
);
CREATE INDEX permits_version ON {schema}.permits (version);

CREATE TABLE {schema}.keys (
    key_hash bytea PRIMARY KEY,
    permit bytea NOT NULL UNIQUE REFERENCES {schema}.permits (hash)
);

-- Σ (charged − settled) over a user's permits in one stablecoin (permits the contract refused
-- excluded), kept as charges and settlements land.
CREATE TABLE {schema}.unsettled (
    user_addr bytea NOT NULL,
    token bytea NOT NULL,
    amount numeric(78, 0) NOT NULL DEFAULT 0,
    PRIMARY KEY (user_addr, token)
);

CREATE TABLE {schema}.journal (
    seq bigserial PRIMARY KEY,
    request_id text NOT NULL UNIQUE,
    client_request_id text,
    permit bytea NOT NULL REFERENCES {schema}.permits (hash),
    amount numeric(78, 0) NOT NULL,
    cumulative_amount numeric(78, 0) NOT NULL,
    cumulative_requests bigint NOT NULL,
    at bigint NOT NULL,
    UNIQUE (permit, cumulative_requests)
);
CREATE INDEX journal_client_id ON {schema}.journal (permit, client_request_id, seq DESC)
    WHERE client_request_id IS NOT NULL;

-- Charges a batch (the group commit: one statement, one transaction, one WAL flush for all).
-- Rows are locked in one global order (permits by hash, then unsettled rows by key) so two
-- replicas' batches never deadlock. Each charge is refused on its own ('unknown', 'rejected',
-- 'cap', 'funds') without touching the others.
CREATE FUNCTION {schema}.charge(
    hashes bytea[], amounts numeric[], request_ids text[], client_ids text[], limits numeric[], at_ bigint
) RETURNS TABLE (o_i int, o_seq bigint, o_amount text, o_requests bigint, o_refused text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n int := coalesce(array_length(hashes, 1), 0);
    p record;
    ca numeric;
    cr bigint;
BEGIN
    PERFORM 1 FROM {schema}.permits WHERE hash = ANY (hashes) ORDER BY hash FOR UPDATE;
    PERFORM 1 FROM {schema}.unsettled u
        WHERE (u.user_addr, u.token) IN (SELECT user_addr, token FROM {schema}.permits WHERE hash = ANY (hashes))
        ORDER BY u.user_addr, u.token FOR UPDATE;
    -- the common case, set-based: every charge of the batch fits (each permit's cap with all its
    -- charges together, each user's deposit with all of theirs): one update per permit and per
    -- user, one insert for the journal
    IF NOT EXISTS (
        SELECT 1
        FROM (SELECT tt.h, sum(tt.a) AS s FROM unnest(hashes, amounts) AS tt (h, a) GROUP BY tt.h) bp
        LEFT JOIN {schema}.permits pp ON pp.hash = bp.h
        WHERE pp.hash IS NULL OR pp.rejected IS NOT NULL OR pp.charged_amount + bp.s > pp.max_amount
    ) AND NOT EXISTS (
        SELECT 1
        FROM (SELECT pp.user_addr, pp.token, sum(tt.a) AS s, min(tt.l) AS l
              FROM unnest(hashes, amounts, limits) AS tt (h, a, l)
              JOIN {schema}.permits pp ON pp.hash = tt.h
              GROUP BY pp.user_addr, pp.token) bu
        JOIN {schema}.unsettled uu ON uu.user_addr = bu.user_addr AND uu.token = bu.token
        WHERE uu.amount + bu.s > bu.l
    ) THEN
        RETURN QUERY
        WITH tt AS (
            SELECT * FROM unnest(hashes, amounts, request_ids, client_ids) WITH ORDINALITY AS x (h, a, r, c, i)
        ), numbered AS (
            SELECT tt.i, tt.h, tt.a, tt.r, tt.c,
                   pp.charged_amount + sum(tt.a) OVER (PARTITION BY tt.h ORDER BY tt.i) AS cum_a,
                   pp.charged_requests + row_number() OVER (PARTITION BY tt.h ORDER BY tt.i) AS cum_r
            FROM tt JOIN {schema}.permits pp ON pp.hash = tt.h
        ), per_permit AS (
            UPDATE {schema}.permits pp
            SET charged_amount = pp.charged_amount + sp.s,
                charged_requests = pp.charged_requests + sp.cnt,
                version = nextval('{schema}.versions')
            FROM (SELECT tt.h, sum(tt.a) AS s, count(*) AS cnt FROM tt GROUP BY tt.h) sp
            WHERE pp.hash = sp.h
        ), per_user AS (
            UPDATE {schema}.unsettled uu
            SET amount = uu.amount + su.s
            FROM (SELECT pp.user_addr, pp.token, sum(tt.a) AS s
                  FROM tt JOIN {schema}.permits pp ON pp.hash = tt.h
                  GROUP BY pp.user_addr, pp.token) su
            WHERE uu.user_addr = su.user_addr AND uu.token = su.token
        ), journaled AS (
            INSERT INTO {schema}.journal
                (request_id, client_request_id, permit, amount, cumulative_amount, cumulative_requests, at)
            SELECT numbered.r, numbered.c, numbered.h, numbered.a, numbered.cum_a, numbered.cum_r, at_
            FROM numbered ORDER BY numbered.i
            RETURNING journal.seq, journal.request_id
        )
        SELECT numbered.i::int, journaled.seq, numbered.cum_a::text, numbered.cum_r::bigint, NULL::text
        FROM numbered JOIN journaled ON journaled.request_id = numbered.r;
        RETURN;
    END IF;
    -- otherwise one charge at a time, each refused on its own
    FOR k IN 1 .. n LOOP
        o_i := k; o_seq := NULL; o_amount := NULL; o_requests := NULL; o_refused := NULL;
        SELECT user_addr, token, max_amount, charged_amount, rejected INTO p
            FROM {schema}.permits WHERE hash = hashes[k];
        IF NOT FOUND THEN
            o_refused := 'unknown';
        ELSIF p.rejected IS NOT NULL THEN
            o_refused := 'rejected';
        ELSIF p.charged_amount + amounts[k] > p.max_amount THEN
            o_refused := 'cap';
        ELSE
            UPDATE {schema}.unsettled SET amount = amount + amounts[k]
                WHERE user_addr = p.user_addr AND token = p.token AND amount + amounts[k] <= limits[k];
            IF NOT FOUND THEN
                o_refused := 'funds';
            ELSE
                UPDATE {schema}.permits
                    SET charged_amount = charged_amount + amounts[k],
                        charged_requests = charged_requests + 1,
                        version = nextval('{schema}.versions')
                    WHERE hash = hashes[k]
                    RETURNING charged_amount, charged_requests INTO ca, cr;
                INSERT INTO {schema}.journal
                    (request_id, client_request_id, permit, amount, cumulative_amount, cumulative_requests, at)
                    VALUES (request_ids[k], client_ids[k], hashes[k], amounts[k], ca, cr, at_)
                    RETURNING seq INTO o_seq;
                o_amount := ca::text;
                o_requests := cr;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Records what PaymentStream says is settled on a permit; settled totals only grow.
CREATE FUNCTION {schema}.settled(h bytea, amt numeric, reqs bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    p record;
    before numeric;
    after numeric;
BEGIN
    SELECT * INTO p FROM {schema}.permits WHERE hash = h FOR UPDATE;
    IF NOT FOUND OR (amt <= p.settled_amount AND reqs <= p.settled_requests) THEN
        RETURN false;
    END IF;
    before := GREATEST(p.charged_amount - p.settled_amount, 0);
    after := GREATEST(p.charged_amount - GREATEST(p.settled_amount, amt), 0);
    UPDATE {schema}.permits
        SET settled_amount = GREATEST(settled_amount, amt),
            settled_requests = GREATEST(settled_requests, reqs),
            version = nextval('{schema}.versions')
        WHERE hash = h;
    IF p.rejected IS NULL THEN
        UPDATE {schema}.unsettled SET amount = GREATEST(amount - (before - after), 0)
            WHERE user_addr = p.user_addr AND token = p.token;
    END IF;
    RETURN true;
END $$;

-- Marks a permit the contract refused for good: it stops holding the user's funds.
CREATE FUNCTION {schema}.rejected(h bytea, reason smallint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    p record;
BEGIN
    SELECT * INTO p FROM {schema}.permits WHERE hash = h FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE {schema}.permits SET rejected = reason, version = nextval('{schema}.versions') WHERE hash = h;
    IF p.rejected IS NULL THEN
        UPDATE {schema}.unsettled SET amount = GREATEST(amount - GREATEST(p.charged_amount - p.settled_amount, 0), 0)
            WHERE user_addr = p.user_addr AND token = p.token;
    END IF;
    RETURN true;
END $$;
