"""FraiseQL's schema for the GraphQL bench (benches/graphql.rs): the three operations the bench
sends every server, over the example's v_order and tb_order (sql/example/schema.sql). Run with
FraiseQL's Python SDK in the directory that receives schema.json; fraiseql-cli compiles it."""
import fraiseql
from fraiseql.scalars import ID, DateTime, Decimal


@fraiseql.type
class Order:
    id: ID
    identifier: str
    total: Decimal
    status: str
    created_at: DateTime


@fraiseql.query(sql_source="v_order")
def order(id: ID) -> Order | None:
    pass


@fraiseql.query(sql_source="v_order")
def orders(limit: int = 20, offset: int = 0) -> list[Order]:
    pass


@fraiseql.mutation(sql_source="fn_fraiseql_create_order", operation="CREATE")
def create_order(identifier: str, total: Decimal) -> Order:
    pass


fraiseql.export_schema("schema.json")
