"""Synthetic agent logs: three call sites of two applications, with plausible fake PII.

- `shop-support`: an e-commerce support agent (orders, refunds, shipping) — multi-turn, tools.
- `hr-assistant`: an internal HR/calendar agent (meetings, time off) — multi-turn, tools.
- `ticket-triage`: a single-shot internal call that turns a support ticket into JSON — no tools.

Everything comes from Faker and the templates below, seeded: the same seed gives the same file.
The agent's behaviour is deliberately regular (which tool for which request, ids copied from
the conversation into arguments), as a real agent's is, so that a small model can learn it.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from slmconvert.io import atomic_path
from slmconvert.demo.exports import EXPORTS

SHOP_SYSTEM = (
    "You are ShopAssist, the customer support agent of Northwind Outfitters, an online store for outdoor gear.\n"
    "Policy:\n- Always look up the order before acting on it.\n- Orders can be cancelled only while 'processing'.\n"
    "- Refund damaged items in full; never refund more than the item price.\n- Address changes are allowed until the order ships.\n"
    "- Transfer to a human agent when the customer asks for one or is abusive.\nBe concise and friendly. Today is {today}."
)
HR_SYSTEM = (
    "You are the HR assistant of Contoso Ltd. You help employees book meetings and request time off.\n"
    "Rules: find an employee before booking with them; check availability before booking; meetings last 30 or 60 minutes;\n"
    "employees have 25 days of paid leave per year and must request leave at least 7 days in advance.\nCurrent date: {today}."
)
TRIAGE_SYSTEM = (
    "You classify customer support tickets. Reply with JSON only: "
    '{"category": one of ["billing", "shipping", "product", "account"], "priority": "low" | "medium" | "high", '
    '"summary": one sentence without personal data}.'
)


def _fn(name: str, desc: str, props: dict[str, Any], required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": desc,
                                             "parameters": {"type": "object", "properties": props, "required": required}}}


S = {"type": "string"}
SHOP_TOOLS = [
    _fn("get_order", "Look up an order by its id.", {"order_id": S}, ["order_id"]),
    _fn("get_customer", "Find a customer by e-mail address.", {"email": S}, ["email"]),
    _fn("cancel_order", "Cancel an order that is still processing.", {"order_id": S, "reason": S}, ["order_id", "reason"]),
    _fn("refund_item", "Refund one item of an order.", {"order_id": S, "item_id": S, "amount": {"type": "number"}}, ["order_id", "item_id", "amount"]),
    _fn("update_shipping_address", "Change the delivery address of an order.",
        {"order_id": S, "address": {"type": "object", "properties": {"street": S, "city": S, "zip": S}}}, ["order_id", "address"]),
    _fn("track_shipment", "Get the carrier status of a shipment.", {"tracking_number": S}, ["tracking_number"]),
    _fn("transfer_to_human", "Hand the conversation to a human agent.", {"summary": S}, ["summary"]),
]
HR_TOOLS = [
    _fn("find_employee", "Find an employee by full name.", {"name": S}, ["name"]),
    _fn("check_availability", "Free slots of an employee on a date.", {"employee_id": S, "date": S}, ["employee_id", "date"]),
    _fn("book_meeting", "Book a meeting.", {"attendee_id": S, "date": S, "start_time": S, "duration_minutes": {"type": "integer"}, "title": S},
        ["attendee_id", "date", "start_time", "duration_minutes", "title"]),
    _fn("submit_leave_request", "Request paid leave.", {"employee_id": S, "start_date": S, "end_date": S}, ["employee_id", "start_date", "end_date"]),
]

PRODUCTS = [("Trail Runner 2 shoes", 129.0), ("Alpine 40L backpack", 159.0), ("Ultralight tent", 349.0), ("Merino base layer", 79.0),
            ("Down jacket", 249.0), ("Headlamp 400", 39.0), ("Trekking poles", 89.0), ("Sleeping bag -5C", 199.0)]
REASONS = ["I ordered the wrong size", "I found it cheaper elsewhere", "it will arrive too late", "I changed my mind"]
TOPICS = ["Q3 planning", "onboarding check-in", "budget review", "project kickoff", "1:1", "design review"]


class _Session:
    """Builds one conversation and the list of LLM calls (prompt so far + response) it made."""

    def __init__(self, system: str, tools: list[dict] | None, rng: random.Random):
        self.messages: list[dict] = [{"role": "system", "content": system}]
        self.tools = tools
        self.calls: list[tuple[list[dict], dict]] = []
        self.rng = rng
        self._n = 0

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def say(self, text: str) -> None:
        msg = {"role": "assistant", "content": text}
        self.calls.append((list(self.messages), msg))
        self.messages.append(msg)

    def call(self, name: str, args: dict, result: Any) -> None:
        self._n += 1
        call_id = "call_" + "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=16))
        msg = {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}
        self.calls.append((list(self.messages), msg))
        self.messages.append(msg)
        self.messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(result)})


class Generator:
    def __init__(self, seed: int):
        from faker import Faker

        self.rng = random.Random(seed)
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.start = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc)

    # ------------------------------------------------------------------ helpers
    def _order(self, t: datetime) -> dict:
        f, r = self.fake, self.rng
        items = r.sample(PRODUCTS, r.choice([1, 1, 2]))
        return {
            "order_id": f"NW-{r.randint(100000, 999999)}",
            "status": r.choice(["processing", "processing", "shipped", "delivered"]),
            "placed_at": (t - timedelta(days=r.randint(1, 30))).strftime("%Y-%m-%d"),  # never relative to today
            "items": [{"item_id": f"IT-{r.randint(1000, 9999)}", "name": n, "price": p} for n, p in items],
            "customer": {"name": f.name(), "email": f.email(), "phone": f.phone_number(),
                         "address": {"street": f.street_address(), "city": f.city(), "zip": f.zipcode()}},
            "payment": {"card_last4": f"{r.randint(0, 9999):04d}"},
            "tracking_number": f"1Z{r.randint(10**9, 10**10 - 1)}",
        }

    def _today(self, t: datetime) -> str:
        return t.strftime("%Y-%m-%d")

    # ------------------------------------------------------------------ shop-support
    def shop(self, t: datetime) -> _Session:
        r, f = self.rng, self.fake
        s = _Session(SHOP_SYSTEM.format(today=self._today(t)), SHOP_TOOLS, r)
        o = self._order(t)
        first = o["customer"]["name"].split()[0]
        intent = r.choice(["cancel", "track", "address", "refund", "lookup", "human"])
        oid = o["order_id"]
        if intent == "lookup":
            s.user(r.choice([f"Hi, I can't find my order number. My email is {o['customer']['email']}.",
                             f"Hello, this is {o['customer']['name']}, email {o['customer']['email']}. What did I order recently?"]))
            s.call("get_customer", {"email": o["customer"]["email"]},
                   {"name": o["customer"]["name"], "email": o["customer"]["email"], "phone": o["customer"]["phone"],
                    "orders": [{"order_id": oid, "status": o["status"], "placed_at": o["placed_at"]}]})
            s.say(f"Thanks, {first}. I found one recent order: {oid}, placed on {o['placed_at']}, currently {o['status']}. "
                  "How can I help with it?")
            return s
        opener = {
            "cancel": [f"Hi, I want to cancel order {oid}.", f"Please cancel my order {oid}, {r.choice(REASONS)}."],
            "track": [f"Where is my package? Order {oid}.", f"Hi! Any update on order {oid}? It's been a while."],
            "address": [f"I moved. Can you send order {oid} to my new address?", f"Hello, I need to change the delivery address for {oid}."],
            "refund": [f"The {o['items'][0]['name'].lower()} in order {oid} arrived damaged.", f"Order {oid}: one item was broken on arrival, I want a refund."],
            "human": [f"This is the third time I'm writing about {oid}. Get me a real person now.", f"I want to speak to a human about order {oid}."],
        }[intent]
        s.user(r.choice(opener))
        if intent == "human":
            s.call("transfer_to_human", {"summary": f"Customer asks for a human agent about order {oid}."}, {"status": "transferred", "queue_position": r.randint(1, 9)})
            s.say("I've passed your conversation to a colleague; a human agent will be with you shortly.")
            return s
        view = {k: o[k] for k in ("order_id", "status", "placed_at", "items", "customer", "payment", "tracking_number")}
        s.call("get_order", {"order_id": oid}, view)
        names = " and ".join(i["name"] for i in o["items"])
        if intent == "cancel":
            if o["status"] != "processing":
                s.say(f"I'm sorry, {first}: order {oid} is already {o['status']}, so it can no longer be cancelled. "
                      "You can return it within 30 days of delivery instead.")
                return s
            s.say(f"I found order {oid} ({names}), placed on {o['placed_at']}. Shall I cancel it? May I ask why?")
            reason = r.choice(REASONS)
            s.user(f"Yes please, {reason}.")
            total = sum(i["price"] for i in o["items"])
            s.call("cancel_order", {"order_id": oid, "reason": reason}, {"order_id": oid, "status": "cancelled", "refund_amount": total})
            s.say(f"Done: order {oid} is cancelled. ${total:.2f} will be refunded to your card ending in "
                  f"{o['payment']['card_last4']} within 5-7 business days.")
        elif intent == "track":
            if o["status"] == "processing":
                s.say(f"Order {oid} ({names}) is still being prepared and has not shipped yet. You'll get an e-mail with tracking once it does.")
                return s
            eta = (t + timedelta(days=r.randint(1, 4))).strftime("%Y-%m-%d")
            status = "delivered" if o["status"] == "delivered" else r.choice(["in transit", "out for delivery"])
            s.call("track_shipment", {"tracking_number": o["tracking_number"]},
                   {"tracking_number": o["tracking_number"], "carrier": "UPS", "status": status, "eta": eta, "last_scan": f.city()})
            s.say(f"Your package {o['tracking_number']} is {status}" + (f", expected on {eta}." if status != "delivered" else ".")
                  + " Anything else I can do?")
        elif intent == "address":
            if o["status"] != "processing":
                s.say(f"Order {oid} has already shipped, so I can't change its address any more. I'm sorry, {first}.")
                return s
            s.say("Sure. What is the new address (street, city and ZIP code)?")
            new = {"street": f.street_address(), "city": f.city(), "zip": f.zipcode()}
            s.user(f"{new['street']}, {new['city']} {new['zip']}")
            s.call("update_shipping_address", {"order_id": oid, "address": new}, {"order_id": oid, "address": new, "status": "updated"})
            s.say(f"Updated: order {oid} will be delivered to {new['street']}, {new['city']} {new['zip']}.")
        elif intent == "refund":
            item = o["items"][0]
            s.say(f"I'm sorry about that, {first}. I can refund the {item['name']} (${item['price']:.2f}) in full. Shall I go ahead?")
            s.user(r.choice(["Yes, please.", "Yes go ahead", "ok thanks"]))
            s.call("refund_item", {"order_id": oid, "item_id": item["item_id"], "amount": item["price"]},
                   {"refund_id": f"RF-{r.randint(10000, 99999)}", "amount": item["price"], "status": "approved"})
            s.say(f"Your refund of ${item['price']:.2f} for the {item['name']} is approved; it will reach your card ending in "
                  f"{o['payment']['card_last4']} within 5-7 business days.")
        return s

    # ------------------------------------------------------------------ hr-assistant
    def hr(self, t: datetime) -> _Session:
        r, f = self.rng, self.fake
        s = _Session(HR_SYSTEM.format(today=self._today(t)), HR_TOOLS, r)
        me = f"E{r.randint(10000, 99999)}"
        intent = r.choice(["meeting", "meeting", "leave", "policy"])
        if intent == "meeting":
            other, other_id = f.name(), f"E{r.randint(10000, 99999)}"
            day = (t + timedelta(days=r.randint(1, 10))).strftime("%Y-%m-%d")
            dur = r.choice([30, 60])
            topic = r.choice(TOPICS)
            s.user(r.choice([f"Book a {dur} minute meeting with {other} on {day} about {topic}.",
                             f"Can you set up {topic} with {other} on {day}? {dur} minutes is enough."]))
            s.call("find_employee", {"name": other}, {"employee_id": other_id, "name": other, "email": f.company_email(),
                                                      "phone": f.phone_number(), "department": f.job()})
            slots = sorted(r.sample(["09:00", "10:00", "11:30", "13:00", "14:30", "16:00"], 3))
            s.call("check_availability", {"employee_id": other_id, "date": day}, {"employee_id": other_id, "date": day, "free": slots})
            s.say(f"{other} is free on {day} at {', '.join(slots)}. Which time suits you?")
            pick = r.choice(slots)
            s.user(r.choice([f"{pick} works.", f"Let's do {pick}.", f"{pick} please"]))
            s.call("book_meeting", {"attendee_id": other_id, "date": day, "start_time": pick, "duration_minutes": dur, "title": topic},
                   {"meeting_id": f"M-{r.randint(1000, 9999)}", "status": "booked"})
            s.say(f"Booked: {topic} with {other} on {day} at {pick} for {dur} minutes. Invitations are on their way.")
        elif intent == "leave":
            d1 = t + timedelta(days=r.randint(8, 40))
            d2 = d1 + timedelta(days=r.randint(1, 9))
            a, b = d1.strftime("%Y-%m-%d"), d2.strftime("%Y-%m-%d")
            s.user(r.choice([f"I'd like to take leave from {a} to {b}. My employee id is {me}.",
                             f"Please request vacation {a} - {b} for me, id {me}."]))
            s.call("submit_leave_request", {"employee_id": me, "start_date": a, "end_date": b},
                   {"request_id": f"LR-{r.randint(1000, 9999)}", "status": "pending approval", "days": (d2 - d1).days + 1})
            s.say(f"Your leave request from {a} to {b} is submitted and waiting for your manager's approval.")
        else:
            s.user(r.choice(["How many vacation days do I get per year?", "How far in advance do I need to ask for time off?",
                             "What's the leave policy?"]))
            s.say("Every employee has 25 days of paid leave per year, and leave must be requested at least 7 days in advance. "
                  "I can submit a request for you if you give me the dates and your employee id.")
        return s

    # ------------------------------------------------------------------ ticket-triage
    def triage(self, t: datetime) -> _Session:
        r, f = self.rng, self.fake
        s = _Session(TRIAGE_SYSTEM, None, r)
        cat, prio, text, summary = r.choice([
            ("billing", "high", f"I was charged twice for my order! Card ending {r.randint(1000, 9999)}. Fix this now. - {f.name()}",
             "Customer reports a duplicate charge."),
            ("shipping", "medium", f"My parcel hasn't arrived after 10 days. Address: {f.address().replace(chr(10), ', ')}.",
             "Parcel delayed beyond the expected delivery time."),
            ("product", "low", f"Does the down jacket run small? I'm usually a medium. Thanks, {f.first_name()}",
             "Question about jacket sizing."),
            ("account", "medium", f"I can't log in, the reset e-mail never reaches {f.email()}. Phone me at {f.phone_number()}.",
             "Password reset e-mail not received."),
            ("billing", "medium", f"Please send an invoice for order NW-{r.randint(100000, 999999)} to {f.company_email()}.",
             "Customer requests an invoice."),
            ("product", "high", f"The headlamp battery got very hot and melted. This is dangerous! {f.name()}, {f.phone_number()}",
             "Safety issue: headlamp battery overheated."),
        ])
        s.user(f"Ticket #{r.randint(10000, 99999)}:\n{text}")
        s.say(json.dumps({"category": cat, "priority": prio, "summary": summary}))
        return s

    # ------------------------------------------------------------------ output
    def sessions(self, n: int):
        t = self.start
        kinds = [("shop-support", "northwind-web", "gpt-4o", self.shop), ("hr-assistant", "contoso-hr", "gpt-4o-mini", self.hr),
                 ("ticket-triage", "northwind-web", "gpt-4o", self.triage)]
        for i in range(n):
            workload, client, model, make = kinds[0] if i % 5 in (0, 1) else kinds[1] if i % 5 in (2, 3) else kinds[2]
            t += timedelta(minutes=self.rng.randint(1, 45))
            yield i, workload, client, model, make(t), t


def _completion(msg: dict, model: str, created: int, prompt_chars: int, rng: random.Random) -> dict:
    content = msg.get("content") or ""
    args = "".join(c["function"]["arguments"] for c in msg.get("tool_calls") or [])
    completion_tokens = max(1, (len(content) + len(args)) // 4)
    return {
        "id": "chatcmpl-" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", k=24)),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_chars // 4 + completion_tokens},
    }


FORMATS = ("request-response", "trajectory", "shapes", "anthropic", "responses", "otel", "langfuse", "litellm", "langsmith")


def _shapes(gen: "Generator", sessions: int, seed: int) -> tuple[list[dict], int]:
    """The same agents in the layouts other agents' logs come in: one object per agent holding its policy
    (the system prompt, stored once), its tools and its conversations, each nested under output.history;
    a user who makes their own tool call (an environment event); a triage agent that acts in plain text
    (`FINISH({...})`); a per-user client id that names no agent."""
    groups: dict[str, dict] = {}
    calls = 0
    for i, workload, client, model, s, t in gen.sessions(sessions):
        system = s.messages[0]["content"]
        history = [dict(m) for m in s.messages[1:]]
        if s.tools is None:  # the tool-less triage agent answers by writing FINISH({...})
            history = [{"role": "assistant", "content": f"FINISH({m['content']})"} if m["role"] == "assistant" else m
                       for m in history]
        elif workload == "hr-assistant" and i % 2 == 0:  # the employee shares their calendar from their own device
            history[1:1] = [
                {"role": "user", "content": "Sharing my calendar with you.",
                 "tool_calls": [{"id": f"u{i}", "type": "function", "function": {"name": "share_calendar", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": f"u{i}", "requestor": "user", "content": "calendar shared (read-only)"},
            ]
        g = groups.setdefault(workload, {"info": {"agent_version": "1.4", "model": model}, "agent": workload,
                                         "policy": system, "simulations": []})
        if s.tools:
            g["tools"] = s.tools
        g["simulations"].append({"simulation_id": f"sim-{seed}-{i:05d}", "client_id": f"{client}-user-{i % 7}",
                                 "started_at": t.isoformat().replace("+00:00", "Z"), "output": {"history": history, "reward": 1.0}})
        calls += len(s.calls)
    return list(groups.values()), calls


def generate(out: str | Path, sessions: int = 120, seed: int = 0, fmt: str = "request-response") -> dict[str, int]:
    """Write the sample log; returns {"records", "sessions", "calls"}."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    gen = Generator(seed)
    records, calls = [], 0
    if fmt == "shapes":
        records, calls = _shapes(gen, sessions, seed)
    for i, workload, client, model, s, t in ([] if fmt == "shapes" else gen.sessions(sessions)):
        sid = f"sess-{seed}-{i:05d}"
        if fmt == "trajectory":
            rec = {"session_id": sid, "agent": client, "workload_id": workload, "model": s.messages and model, "messages": s.messages}
            if s.tools:
                rec["tools"] = s.tools
            records.append(rec)
            calls += len(s.calls)
            continue
        for k, (prompt, msg) in enumerate(s.calls):
            ts = t + timedelta(seconds=20 * k)
            req = {"model": model, "messages": prompt, "temperature": 0.0}
            if s.tools:
                req["tools"] = s.tools
            prompt_chars = sum(len(m.get("content") or "") for m in prompt)
            records.append({
                "timestamp": ts.isoformat().replace("+00:00", "Z"),
                "client_id": client,
                "workload_id": workload,
                "session_id": sid,
                "latency_ms": round(gen.rng.uniform(350, 2400), 1),
                "request": req,
                "response": _completion(msg, model, int(ts.timestamp()), prompt_chars, gen.rng),
            })
            calls += 1
    if fmt in EXPORTS:  # the same calls, written the way that tool logs them
        records = list(EXPORTS[fmt](records))
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"records": len(records), "sessions": sessions, "calls": calls}
