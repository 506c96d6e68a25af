//! The `orders` table the streaming and status tests share, and reading its events back.

use super::*;
use serde_json::Value;

pub const ORDERS: &str = "
    CREATE TABLE tb_order (
        pk_order BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        identifier TEXT NOT NULL,
        total NUMERIC(10, 2) NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
    );
    CREATE TABLE tb_order_item (
        pk_order_item BIGINT PRIMARY KEY,
        fk_order BIGINT NOT NULL,
        quantity INTEGER NOT NULL
    );";

pub fn events<'a>(messages: &'a [Stored], table: &str) -> Vec<&'a Value> {
    messages
        .iter()
        .map(|m| &m.body)
        .filter(|b| b["table"] == table)
        .collect()
}
