"""A workload written in Python (py-spiffe): fetches its X509-SVID, the
bundles and a JWT-SVID from the agent, validates the JWT through the agent,
and prints what it got as one JSON object. Any failure raises (non-zero)."""

import json
import sys

from spiffe import TrustDomain, WorkloadApiClient

socket, audience = sys.argv[1], sys.argv[2]
client = WorkloadApiClient(socket_path=socket)
svid = client.fetch_x509_svid()
bundles = client.fetch_x509_bundles()
bundle = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
jwt = client.fetch_jwt_svid(audience={audience})
validated = client.validate_jwt_svid(jwt.token, audience)
jwt_bundles = client.fetch_jwt_bundles()
print(
    json.dumps(
        {
            "x509_spiffe_id": str(svid.spiffe_id),
            "chain_len": len(svid.cert_chain),
            "bundle_authorities": len(bundle.x509_authorities) if bundle else 0,
            "jwt_spiffe_id": str(jwt.spiffe_id),
            "jwt_audience": sorted(jwt.audience),
            "validated_spiffe_id": str(validated.spiffe_id),
            "jwt_bundle": jwt_bundles.get_bundle_for_trust_domain(TrustDomain("example.org")) is not None,
        }
    )
)
client.close()
