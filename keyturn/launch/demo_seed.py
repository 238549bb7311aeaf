"""Seed the demo `shop` database with deterministic, realistic-looking but fake PII.

`seed_shop` (re)creates the `customers` and `orders` tables in a database the caller already
created, and fills them from a seeded `random.Random`, so every run produces the same rows.  The
data exists to give the gateway's masking and approval rules something sensitive-looking to guard.

This module must not produce data tied to real people or real accounts: emails only use the
reserved example.com/.org/.net domains, phone numbers use the fictional 555-01xx block, and SSNs
and card numbers are random digits that merely have a valid shape (SSN area rules, Luhn check).
It must not create the database itself, and it touches no tables other than its own two.
Part of the launcher (``keyturn demo``): the core and the edges must not import it.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import psycopg

__all__ = [
    "Customer",
    "fake_card_number",
    "fake_customers",
    "fake_phone",
    "fake_ssn",
    "luhn_check_digit",
    "seed_shop",
]

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Wei", "Olivia", "Mateo", "Priya", "Liam", "Fatima", "Noah",
    "Sofia", "Hiroshi", "Emma", "Diego", "Chloe", "Kwame", "Ava", "Lucas", "Ingrid", "Omar",
    "Grace", "Ravi", "Hannah", "Jonas", "Elena", "Samuel", "Yuki", "Daniel", "Amara", "Felix",
)
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Chen", "Johnson", "Garcia", "Patel", "Brown", "Nguyen", "Okafor",
    "Rossi", "Tanaka", "Miller", "Hernandez", "Dubois", "Mensah", "Wilson", "Silva", "Larsen",
    "Haddad", "Kim", "Murphy", "Novak", "Schmidt", "Ivanova", "Cohen", "Sato", "Walker",
    "Adeyemi", "Fischer",
)
CITIES = (
    "Portland", "Austin", "Chicago", "Denver", "Boston", "Seattle", "Atlanta", "Phoenix",
    "Minneapolis", "Nashville", "San Diego", "Pittsburgh", "Raleigh", "Madison", "Tucson",
)
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
AREA_CODES = ("212", "303", "312", "404", "415", "503", "512", "602", "617", "206", "615", "919")
ORDER_STATUSES = ("pending", "paid", "shipped", "delivered", "cancelled", "refunded")
# Most orders complete; a few go wrong, which makes status filters in the demo meaningful.
ORDER_STATUS_WEIGHTS = (10, 15, 20, 45, 6, 4)
_ORDERS_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

SCHEMA = """
DROP TABLE IF EXISTS orders, customers CASCADE;
CREATE TABLE customers (
    id serial PRIMARY KEY,
    full_name text NOT NULL,
    email text NOT NULL UNIQUE,
    ssn text NOT NULL,
    card_number text NOT NULL,
    phone text,
    city text,
    created_at timestamptz DEFAULT now()
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int REFERENCES customers,
    total numeric(10,2),
    status text,
    placed_at timestamptz
);
CREATE INDEX orders_customer_id_idx ON orders (customer_id);
"""


@dataclass(frozen=True)
class Customer:
    full_name: str
    email: str
    ssn: str
    card_number: str
    phone: str
    city: str


def luhn_check_digit(partial: str) -> int:
    """The digit that makes `partial` + digit pass the Luhn check."""
    total = 0
    # Walking right-to-left over the partial number, the first digit is the one that gets doubled
    # once the check digit is appended.
    for index, char in enumerate(reversed(partial)):
        digit = int(char)
        if index % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def fake_card_number(rng: random.Random) -> str:
    """16 digits, Visa-like (4...) or Mastercard-like (51-55...), Luhn-valid."""
    prefix = "4" if rng.random() < 0.5 else str(rng.randint(51, 55))
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(15 - len(prefix)))
    return body + str(luhn_check_digit(body))


def fake_ssn(rng: random.Random) -> str:
    """AAA-GG-SSSS, never area 000, 666 or 900-999, group 00 or serial 0000 (never issued)."""
    area = rng.randint(1, 899)
    while area == 666:
        area = rng.randint(1, 899)
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def fake_phone(rng: random.Random) -> str:
    # 555-0100..0199 is the block reserved for fiction; other 555 numbers can be real.
    return f"({rng.choice(AREA_CODES)}) 555-01{rng.randint(0, 99):02d}"


def fake_customers(count: int, rng: random.Random) -> Iterator[Customer]:
    """`count` customers with unique emails, deterministic for a given `rng` state."""
    seen: set[str] = set()
    for _ in range(count):
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        domain = rng.choice(EMAIL_DOMAINS)
        local = f"{first}.{last}".lower()
        email = f"{local}@{domain}"
        suffix = 1
        # Only 900 name pairs x 3 domains: number the repeats like real mail providers would.
        while email in seen:
            suffix += 1
            email = f"{local}{suffix}@{domain}"
        seen.add(email)
        yield Customer(
            full_name=f"{first} {last}",
            email=email,
            ssn=fake_ssn(rng),
            card_number=fake_card_number(rng),
            phone=fake_phone(rng),
            city=rng.choice(CITIES),
        )


def seed_shop(dsn: str, *, customers: int = 200, orders: int = 1000, seed: int = 7) -> None:
    """Drop and recreate `customers` and `orders` in the database `dsn` names, then fill them.

    Tables depending on these (views, foreign keys) are dropped too (CASCADE): this is demo data.
    Everything happens in one transaction, so a failure leaves the previous contents in place.
    """
    if customers < 0 or orders < 0:
        raise ValueError("customers and orders must be non-negative")
    if orders and not customers:
        raise ValueError("orders need at least one customer to belong to")
    rng = random.Random(seed)
    people = list(fake_customers(customers, rng))

    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(SCHEMA.encode())
        with cur.copy(
            "COPY customers (full_name, email, ssn, card_number, phone, city) FROM STDIN"
        ) as copy:
            for person in people:
                copy.write_row(
                    (
                        person.full_name,
                        person.email,
                        person.ssn,
                        person.card_number,
                        person.phone,
                        person.city,
                    )
                )
        # Read the ids back instead of assuming 1..n, so nothing depends on sequence state.
        cur.execute("SELECT id FROM customers ORDER BY id")
        customer_ids = [row[0] for row in cur.fetchall()]
        with cur.copy("COPY orders (customer_id, total, status, placed_at) FROM STDIN") as copy:
            for _ in range(orders):
                placed_at = _ORDERS_EPOCH + dt.timedelta(seconds=rng.randint(0, 365 * 86400))
                copy.write_row(
                    (
                        rng.choice(customer_ids),
                        Decimal(rng.randint(500, 99_999)) / 100,
                        rng.choices(ORDER_STATUSES, weights=ORDER_STATUS_WEIGHTS)[0],
                        placed_at,
                    )
                )
        # Fresh tables have no statistics; the demo's EXPLAINs should look sensible at once.
        cur.execute("ANALYZE customers, orders")
