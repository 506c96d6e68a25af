-- FraiseQL's createOrder for the GraphQL bench (benches/graphql.rs): the insert the example's
-- fn_create_order makes, returned in the 13 columns of FraiseQL's mutation_response (its
-- fraiseql.mutation_ok helper comes from `fraiseql-cli setup`).
CREATE FUNCTION fn_fraiseql_create_order(identifier TEXT, total NUMERIC)
RETURNS TABLE (
    succeeded boolean, state_changed boolean, error_class text, status_detail text,
    http_status smallint, message text, entity_id uuid, entity_type text, entity jsonb,
    updated_fields text[], cascade jsonb, error_detail jsonb, metadata jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    v_id UUID;
BEGIN
    INSERT INTO tb_order (identifier, fk_user, total, status)
    VALUES (fn_fraiseql_create_order.identifier, 1, fn_fraiseql_create_order.total, 'pending')
    RETURNING tb_order.id INTO v_id;
    RETURN QUERY SELECT * FROM fraiseql.mutation_ok(
        (SELECT v.data FROM v_order v WHERE v.id = v_id), v_id, 'Order');
END;
$$;
