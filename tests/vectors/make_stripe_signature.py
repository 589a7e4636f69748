#!/usr/bin/env python3
"""Makes tests/vectors/stripe_signature.json ONCE with Stripe's official Python
library (`pip install stripe`; made with stripe 16.1.0), so meterd's verifier is
checked against a header Stripe's own code produced, not only against itself.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install stripe
    /tmp/v/bin/python tests/vectors/make_stripe_signature.py > tests/vectors/stripe_signature.json
"""
import json

import stripe

SECRET = "whsec_meterd_test_vector_0123456789abcdef"
TIMESTAMP = 1764806400  # 2025-12-04T00:00:00Z
PAYLOAD = json.dumps(
    {
        "id": "evt_1VectorSubUpdated",
        "object": "event",
        "type": "customer.subscription.updated",
        "created": 1764806399,
        "data": {
            "object": {
                "id": "sub_1Vector",
                "object": "subscription",
                "customer": "cus_Vector",
                "status": "active",
                "billing_cycle_anchor": 1764547200,
                "metadata": {"meterd_customer": "u_vector"},
                "items": {"object": "list", "data": [{"price": {"id": "price_1PqStarter", "lookup_key": "starter_monthly"}}]},
            }
        },
    },
    separators=(",", ":"),
)

header = stripe.WebhookSignature.generate_signature_header(PAYLOAD, SECRET, timestamp=TIMESTAMP)
# The library's own verifier accepts it (tolerance None: no clock check).
stripe.WebhookSignature.verify_header(PAYLOAD, header, SECRET, tolerance=None)
print(
    json.dumps(
        {"library": "stripe-python " + stripe.VERSION, "secret": SECRET, "timestamp": TIMESTAMP, "payload": PAYLOAD, "header": header},
        indent=2,
    )
)
