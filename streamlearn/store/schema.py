"""Schema of the store, as migrations recorded in ``_sqlite_migrations``.

Add a new migration function at the end; never edit one that has shipped.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("streamlearn")


@migrations()
def m001_initial(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE inbox (
            seq INTEGER PRIMARY KEY,
            received_at REAL NOT NULL,
            topic TEXT NOT NULL,
            stream TEXT NOT NULL,
            kind TEXT NOT NULL,
            device TEXT NOT NULL,
            msg_key TEXT,
            payload_hash INTEGER NOT NULL,
            payload BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX inbox_msg_key ON inbox(msg_key) WHERE msg_key IS NOT NULL")
    db.execute("CREATE INDEX inbox_payload_hash ON inbox(payload_hash)")
    db.execute(
        """
        CREATE TABLE dead_letter (
            id INTEGER PRIMARY KEY,
            received_at REAL NOT NULL,
            topic TEXT NOT NULL,
            stream TEXT,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            payload_size INTEGER NOT NULL,
            payload BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX dead_letter_stream ON dead_letter(stream, received_at)")
    db.execute(
        """
        CREATE TABLE models (
            stream TEXT NOT NULL,
            model_key TEXT NOT NULL,
            tensors BLOB NOT NULL,
            state TEXT NOT NULL,
            checkpoint_id INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (stream, model_key)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE stream_state (
            stream TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            position INTEGER NOT NULL,
            slots_written INTEGER NOT NULL,
            bytes_written INTEGER NOT NULL,
            duration_ms REAL NOT NULL,
            reason TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE metrics (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            stream TEXT NOT NULL,
            messages INTEGER NOT NULL,
            labelled INTEGER NOT NULL,
            learned INTEGER NOT NULL,
            skipped INTEGER NOT NULL,
            dead_letters INTEGER NOT NULL,
            loss REAL,
            error REAL,
            baseline_error REAL,
            lr REAL
        )
        """
    )
    db.execute("CREATE INDEX metrics_stream_at ON metrics(stream, at)")
    db.execute("CREATE TABLE agent_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migrations()
def m002_drift_events(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE drift_events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            stream TEXT NOT NULL,
            model_key TEXT NOT NULL,
            step INTEGER NOT NULL,
            detector TEXT NOT NULL,
            statistic REAL,
            action TEXT NOT NULL,
            lr_before REAL NOT NULL,
            lr_after REAL NOT NULL,
            loss_before REAL
        )
        """
    )
    db.execute("CREATE INDEX drift_events_stream_at ON drift_events(stream, model_key, at)")


@migrations()
def m003_metrics_batched(db: Database) -> None:
    # labelled readings learned in micro-batches under a backlog (not strictly test-then-train)
    db.execute("ALTER TABLE metrics ADD COLUMN batched INTEGER NOT NULL DEFAULT 0")


@migrations()
def m004_model_versions(db: Database) -> None:
    # Checkpoints are written a few models at a time, across several transactions, so
    # that none of them stalls message handling for long. A model row now belongs to the
    # checkpoint that wrote it, and a checkpoint's row in `checkpoints` is inserted last,
    # in the transaction that completes it. The state a restart loads is, per model, its
    # newest row whose checkpoint is complete; rows of a checkpoint that never completed
    # (checkpoint_id above every id in `checkpoints`) are ignored and deleted on start.
    db.execute(
        """
        CREATE TABLE models_v (
            stream TEXT NOT NULL,
            model_key TEXT NOT NULL,
            checkpoint_id INTEGER NOT NULL,
            tensors BLOB NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (stream, model_key, checkpoint_id)
        )
        """
    )
    db.execute(
        "INSERT INTO models_v (stream, model_key, checkpoint_id, tensors, state, updated_at)"
        " SELECT stream, model_key, checkpoint_id, tensors, state, updated_at FROM models"
    )
    db.execute("DROP TABLE models")
    db.execute("ALTER TABLE models_v RENAME TO models")
    db.execute("CREATE INDEX models_checkpoint ON models(checkpoint_id)")
    db.execute(
        """
        CREATE VIEW current_models AS
        SELECT m.* FROM models m
        WHERE m.checkpoint_id = (
            SELECT max(v.checkpoint_id) FROM models v
            WHERE v.stream = m.stream AND v.model_key = m.model_key
              AND v.checkpoint_id <= (SELECT coalesce(max(id), 0) FROM checkpoints)
        )
        """
    )


@migrations()
def m005_inbox_micro_batch(db: Database) -> None:
    # Under a backlog a model learns its readings in micro-batches; which rows shared one
    # depends on how the messages happened to arrive. Each such row names its micro-batch
    # (the seq of its first row) so that a replay after a restart learns them the same way
    # and lands on the state the agent had (NULL: learned on its own).
    db.execute("ALTER TABLE inbox ADD COLUMN micro_batch INTEGER")


@migrations()
def m006_model_positions(db: Database) -> None:
    # With many per-device models a checkpoint writes only some of the changed ones (the
    # longest unsaved first, see streamlearn.checkpointing); the others keep their older row,
    # and a restart replays their readings since. Each model row records the inbox position
    # its state belongs to, and each checkpoint where a replay must begin for the models it
    # left behind (NULL: at its own position, as every checkpoint before this one).
    db.execute("ALTER TABLE models ADD COLUMN position INTEGER")
    db.execute("UPDATE models SET position = (SELECT c.position FROM checkpoints c WHERE c.id = models.checkpoint_id)")
    db.execute("ALTER TABLE checkpoints ADD COLUMN replay_from INTEGER")
