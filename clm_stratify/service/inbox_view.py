"""What an operator sees and does with the receiver's inbox (``clm-stratify inbox``,
``/healthz``): counts per state, the items retrying, the dead letters; replay or drop them;
prune what is finished. Mixed into :class:`clm_stratify.service.inbox.Inbox`."""

from __future__ import annotations

import json
import time


class OperatorView:
    """Needs ``_db()`` (this thread's connection) and ``_tx()`` (a write transaction)."""

    def depth(self) -> dict[str, int]:
        db = self._db()
        counts = {f"work_{s}": n for s, n in db.execute("SELECT state, count(*) FROM work GROUP BY state")}
        counts.update({f"notifications_{s}": n for s, n in
                       db.execute("SELECT state, count(*) FROM notification GROUP BY state")})
        return counts

    def last_processed(self) -> dict | None:
        row = self._db().execute("SELECT value FROM kv WHERE key = 'last_processed'").fetchone()
        return json.loads(row[0]) if row else None

    def dead_letters(self) -> list[dict]:
        """The dead letters; ``at``: when each became one (None for a notification
        dead-lettered by an earlier release, which did not record it)."""
        return self._listed("state = 'dead'", "updated_at", "state = 'dead'", "dead_at", "at")

    def retrying(self) -> list[dict]:
        """Items that failed at least once and wait for their next try (not yet dead)."""
        return self._listed("state = 'pending' AND last_error IS NOT NULL", "due_at",
                            "state = 'new' AND attempts > 0", "next_at", "next")

    def _listed(self, work_where: str, work_time: str, note_where: str, note_time: str, time_key: str) -> list[dict]:
        """Patient rows, then notification rows, as the ``inbox`` command lists them."""
        db = self._db()
        rows = [{"kind": "patient", "id": r[0], "patient": r[1], "attempts": r[2], "error": r[3], time_key: r[4]}
                for r in db.execute(f"SELECT id, patient, attempts, last_error, {work_time} FROM work "
                                    f"WHERE {work_where} ORDER BY id")]
        rows += [{"kind": "notification", "id": r[0], "patient": None, "attempts": r[1], "error": r[2], time_key: r[3]}
                 for r in db.execute(f"SELECT id, attempts, last_error, {note_time} FROM notification "
                                     f"WHERE {note_where} ORDER BY id")]
        return rows

    def drop(self, kind: str | None = None, item_id: int | None = None) -> int:
        """Give up dead letters (all, or one by kind and id) for good: they leave the
        dead-letter list and stay in the file, marked as dropped by the operator."""
        now = time.time()
        n = 0
        with self._tx() as db:
            one = " AND id = ?" if item_id is not None else ""
            args = () if item_id is None else (item_id,)
            if kind in (None, "patient"):
                n += db.execute("UPDATE work SET state = 'done', updated_at = ?, result = 'dropped by the operator' "
                                f"WHERE state = 'dead'{one}", (now, *args)).rowcount
            if kind in (None, "notification"):
                n += db.execute("UPDATE notification SET state = 'resolved', last_error = 'dropped by the operator: ' "
                                f"|| coalesce(last_error, '') WHERE state = 'dead'{one}", args).rowcount
        return n

    def replay(self, kind: str | None = None, item_id: int | None = None) -> int:
        """Move dead letters back to the queue (all, or one by kind and id)."""
        now = time.time()
        n = 0
        with self._tx() as db:
            if kind in (None, "patient"):
                rows = db.execute("SELECT id, patient FROM work WHERE state = 'dead'" +
                                  (" AND id = ?" if item_id is not None else ""),
                                  (() if item_id is None else (item_id,))).fetchall()
                for wid, patient in rows:
                    if db.execute("SELECT 1 FROM work WHERE patient = ? AND state = 'pending'", (patient,)).fetchone():
                        db.execute("UPDATE work SET state = 'done', result = 'replayed into a waiting item' "
                                   "WHERE id = ?", (wid,))
                    else:
                        db.execute("UPDATE work SET state = 'pending', attempts = 0, due_at = ?, updated_at = ? "
                                   "WHERE id = ?", (now, now, wid))
                    n += 1
            if kind in (None, "notification"):
                cur = db.execute("UPDATE notification SET state = 'new', attempts = 0, next_at = ?, dead_at = NULL "
                                 "WHERE state = 'dead'"
                                 + (" AND id = ?" if item_id is not None else ""),
                                 (now,) if item_id is None else (now, item_id))
                n += cur.rowcount
        self.wakeup.set()
        return n

    def prune(self, older_than: float) -> int:
        """Delete what is finished and older than ``older_than`` seconds: resolved
        notifications and done work rows (dead letters and anything waiting are kept).
        Returns the number of rows deleted."""
        cutoff = time.time() - older_than
        with self._tx() as db:
            n = db.execute("DELETE FROM notification WHERE state = 'resolved' AND received_at < ?",
                           (cutoff,)).rowcount
            n += db.execute("DELETE FROM work WHERE state = 'done' AND updated_at < ?", (cutoff,)).rowcount
        return n
