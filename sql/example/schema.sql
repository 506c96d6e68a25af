-- The order example from FraiseQL's NATS pages, completed so that it runs: the seeds use
-- tb_user, tb_product, tb_inventory, tb_payment and tb_shipping without defining them, and the
-- choreography's services need reservations, failures, a fake payment provider and a
-- dead-letter table.
-- walstream streams the tb_* tables; the views and functions serve the GraphQL front end.

CREATE EXTENSION IF NOT EXISTS pgcrypto;  -- gen_random_uuid() on PostgreSQL < 13

CREATE TYPE mutation_response AS (
    status          TEXT,
    message         TEXT,
    entity_id       UUID,
    entity_type     TEXT,
    entity          JSONB,
    updated_fields  TEXT[],
    cascade         JSONB,
    metadata        JSONB
);

CREATE TABLE tb_user (
    pk_user     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    identifier  TEXT UNIQUE NOT NULL,
    email       TEXT UNIQUE NOT NULL,
    name        TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tb_product (
    pk_product  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    identifier  TEXT UNIQUE NOT NULL,
    name        TEXT NOT NULL,
    price       NUMERIC(10, 2) NOT NULL CHECK (price >= 0)
);

CREATE TABLE tb_order (
    pk_order    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    identifier  TEXT UNIQUE NOT NULL,
    fk_user     BIGINT NOT NULL REFERENCES tb_user(pk_user),
    total       NUMERIC(10, 2) NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    card_token  TEXT,                  -- what the payment service charges (choreography)
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_tb_order_fk_user ON tb_order(fk_user);
CREATE INDEX idx_tb_order_status ON tb_order(status);

CREATE TABLE tb_order_item (
    pk_order_item BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    identifier    TEXT UNIQUE NOT NULL,
    fk_order      BIGINT NOT NULL REFERENCES tb_order(pk_order),
    fk_product    BIGINT NOT NULL REFERENCES tb_product(pk_product),
    quantity      INTEGER NOT NULL CHECK (quantity > 0),
    unit_price    NUMERIC(10, 2) NOT NULL
);
CREATE INDEX idx_tb_order_item_fk_order ON tb_order_item(fk_order);

CREATE TABLE tb_inventory (
    pk_inventory BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fk_product   BIGINT UNIQUE NOT NULL REFERENCES tb_product(pk_product),
    quantity     INTEGER NOT NULL CHECK (quantity >= 0),
    reserved     INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

CREATE TABLE tb_payment (
    pk_payment  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    fk_order    BIGINT UNIQUE NOT NULL REFERENCES tb_order(pk_order),
    amount      NUMERIC(10, 2) NOT NULL,
    status      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tb_shipping (
    pk_shipping     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    fk_order        BIGINT UNIQUE NOT NULL REFERENCES tb_order(pk_order),
    tracking_number TEXT NOT NULL,
    label_url       TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tb_event_log (
    pk_event_log BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           UUID DEFAULT gen_random_uuid() UNIQUE NOT NULL,
    identifier   TEXT UNIQUE NOT NULL,
    event_type   TEXT NOT NULL,
    fk_order     BIGINT REFERENCES tb_order(pk_order),
    data         JSONB NOT NULL DEFAULT '{}',
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_tb_event_log_fk_order ON tb_event_log(fk_order);

-- Read view: the JSONB `data` column is what GraphQL queries return. security_invoker
-- (PostgreSQL 15+) makes the row-level security below apply to whoever reads the view.
CREATE VIEW v_order WITH (security_invoker = true) AS
SELECT
    o.id,
    o.fk_user,
    jsonb_build_object(
        'id', o.id::text,
        'identifier', o.identifier,
        'total', o.total,
        'status', o.status,
        'created_at', o.created_at
    ) AS data
FROM tb_order o;

CREATE FUNCTION fn_create_order(
    p_identifier TEXT,
    p_fk_user BIGINT,
    p_total NUMERIC
) RETURNS mutation_response
LANGUAGE plpgsql AS $$
DECLARE
    v_id UUID;
    v_result mutation_response;
BEGIN
    INSERT INTO tb_order (identifier, fk_user, total, status)
    VALUES (p_identifier, p_fk_user, p_total, 'pending')
    RETURNING id INTO v_id;
    v_result.status := 'success';
    v_result.entity_id := v_id;
    v_result.entity_type := 'Order';
    RETURN v_result;
END;
$$;

CREATE FUNCTION fn_update_order_status(
    p_order_id UUID,
    p_status TEXT
) RETURNS mutation_response
LANGUAGE plpgsql AS $$
DECLARE
    v_result mutation_response;
BEGIN
    UPDATE tb_order SET status = p_status WHERE id = p_order_id;
    IF NOT FOUND THEN
        v_result.status := 'not_found:order';
        v_result.message := 'no order with this id';
        RETURN v_result;
    END IF;
    v_result.status := 'success';
    v_result.entity_id := p_order_id;
    v_result.entity_type := 'Order';
    RETURN v_result;
END;
$$;

CREATE FUNCTION fn_cancel_order(
    p_order_id UUID
) RETURNS mutation_response
LANGUAGE plpgsql AS $$
DECLARE
    v_status TEXT;
    v_result mutation_response;
BEGIN
    SELECT status INTO v_status FROM tb_order WHERE id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        v_result.status := 'not_found:order';
        v_result.message := 'no order with this id';
        RETURN v_result;
    END IF;
    v_result.entity_id := p_order_id;
    v_result.entity_type := 'Order';
    IF v_status = 'cancelled' THEN
        v_result.status := 'noop:already_cancelled';
        RETURN v_result;
    END IF;
    IF v_status = 'shipped' THEN
        v_result.status := 'failed:already_shipped';
        v_result.message := 'a shipped order cannot be cancelled';
        RETURN v_result;
    END IF;
    UPDATE tb_order SET status = 'cancelled' WHERE id = p_order_id;
    v_result.status := 'updated';
    v_result.updated_fields := ARRAY['status'];
    RETURN v_result;
END;
$$;

-- The order choreography (integration/choreography/): order → inventory → payment →
-- shipping, with a compensation and an audit log. Each service's database transaction writes
-- rows; walstream turns those row changes into the events the next service consumes (the
-- routes in integration/choreography/walstream.toml). No service publishes to NATS itself.
-- Inventory's answer to an order: the reservation (its INSERT is events.inventory.reserved)
-- or the reason it failed (events.order.failed).
CREATE TABLE tb_reservation (
    pk_reservation BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fk_order       BIGINT UNIQUE NOT NULL REFERENCES tb_order(pk_order),
    status         TEXT NOT NULL DEFAULT 'reserved',   -- reserved | released | consumed
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tb_order_failure (
    pk_order_failure BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fk_order         BIGINT UNIQUE NOT NULL REFERENCES tb_order(pk_order),
    reason           TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The fake payment provider's ledger: one charge per idempotency key, as real providers do.
CREATE TABLE tb_provider_charge (
    pk_provider_charge BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key    TEXT UNIQUE NOT NULL,
    card_token         TEXT,
    amount             NUMERIC(10, 2) NOT NULL,
    approved           BOOLEAN NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Messages a service gave up on after max_deliver attempts.
CREATE TABLE tb_dead_letter (
    pk_dead_letter  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service         TEXT NOT NULL,
    subject         TEXT NOT NULL,
    stream_sequence BIGINT NOT NULL,
    data            JSONB,
    error           TEXT NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (service, stream_sequence)
);

-- The fake provider: declines the card `tok_declined` and any amount over 1,000; a second
-- call with the same key returns the first answer and charges nothing more.
CREATE FUNCTION fn_provider_charge(p_key TEXT, p_card_token TEXT, p_amount NUMERIC)
RETURNS BOOLEAN
LANGUAGE sql AS $$
    INSERT INTO tb_provider_charge (idempotency_key, card_token, amount, approved)
    VALUES (p_key, p_card_token, p_amount,
            coalesce(p_card_token, '') <> 'tok_declined' AND p_amount <= 1000)
    ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
    RETURNING approved;
$$;

-- An order with its items in one transaction; the total is computed from the products' prices.
-- p_items: [{"product": "widget", "quantity": 2}, …]
CREATE FUNCTION fn_place_order(
    p_identifier TEXT,
    p_fk_user BIGINT,
    p_items JSONB,
    p_card_token TEXT
) RETURNS mutation_response
LANGUAGE plpgsql AS $$
DECLARE
    v_pk BIGINT;
    v_id UUID;
    v_missing TEXT;
    v_result mutation_response;
BEGIN
    SELECT item ->> 'product' INTO v_missing
    FROM jsonb_array_elements(p_items) item
    LEFT JOIN tb_product p ON p.identifier = item ->> 'product'
    WHERE p.pk_product IS NULL OR (item ->> 'quantity')::int <= 0
    LIMIT 1;
    IF v_missing IS NOT NULL OR jsonb_array_length(p_items) = 0 THEN
        v_result.status := 'failed:invalid_items';
        v_result.message := coalesce('unknown product or bad quantity: ' || v_missing, 'no items');
        RETURN v_result;
    END IF;
    INSERT INTO tb_order (identifier, fk_user, total, status, card_token)
    SELECT p_identifier, p_fk_user, sum(p.price * (item ->> 'quantity')::int), 'pending', p_card_token
    FROM jsonb_array_elements(p_items) item
    JOIN tb_product p ON p.identifier = item ->> 'product'
    RETURNING pk_order, id INTO v_pk, v_id;
    INSERT INTO tb_order_item (identifier, fk_order, fk_product, quantity, unit_price)
    SELECT p_identifier || '-' || ordinality, v_pk, p.pk_product, (item ->> 'quantity')::int, p.price
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS items(item, ordinality)
    JOIN tb_product p ON p.identifier = item ->> 'product';
    v_result.status := 'success';
    v_result.entity_id := v_id;
    v_result.entity_type := 'Order';
    RETURN v_result;
END;
$$;


-- Row-level security for the GraphQL front end: a request whose token carries
-- {"role": "app_user", "user_pk": 1} runs as app_user and sees and writes only user 1's
-- orders. (walstream reads the WAL, which row-level security does not filter.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user') THEN
        CREATE ROLE app_user NOLOGIN;
    END IF;
END
$$;
-- The choreography's payment service marks orders paid through GraphQL as order_service,
-- which sees every order. (walstream's database role must be a member of both roles to switch
-- to them: GRANT app_user, order_service TO <walstream's login role>.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'order_service') THEN
        CREATE ROLE order_service NOLOGIN BYPASSRLS;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO order_service;
GRANT SELECT ON v_order TO order_service;
GRANT SELECT, UPDATE ON tb_order TO order_service;
GRANT EXECUTE ON FUNCTION fn_update_order_status TO order_service;

GRANT USAGE ON SCHEMA public TO app_user;
GRANT SELECT ON v_order, tb_order, tb_user, tb_product TO app_user;
GRANT INSERT, UPDATE ON tb_order TO app_user;
GRANT SELECT, INSERT ON tb_order_item TO app_user;
GRANT EXECUTE ON FUNCTION fn_create_order, fn_update_order_status, fn_cancel_order, fn_place_order
    TO app_user;
ALTER TABLE tb_order ENABLE ROW LEVEL SECURITY;
CREATE POLICY tb_order_owner ON tb_order
    USING (fk_user = nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'user_pk', '')::bigint)
    WITH CHECK (fk_user = nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'user_pk', '')::bigint);

-- Sample data: one user, two products with stock.
INSERT INTO tb_user (identifier, email, name) VALUES ('alice', 'alice@example.com', 'Alice');
INSERT INTO tb_product (identifier, name, price) VALUES
    ('widget', 'Widget', 9.99),
    ('gadget', 'Gadget', 24.50);
INSERT INTO tb_inventory (fk_product, quantity)
SELECT pk_product, 100 FROM tb_product;
