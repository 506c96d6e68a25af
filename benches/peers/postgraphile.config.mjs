// PostGraphile 5's configuration for the GraphQL bench (benches/graphql.rs), which copies it
// into PostGraphile's install directory (the presets resolve from there). The amber preset
// over the public schema, JWTs verified as every server in the bench verifies them.
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { PgLazyJWTPreset } from "postgraphile/presets/lazy-jwt";
import { makePgService } from "postgraphile/adaptors/pg";

export default {
  extends: [PostGraphileAmberPreset, PgLazyJWTPreset],
  pgServices: [
    makePgService({
      connectionString: process.env.DATABASE_URL,
      schemas: ["public"],
      poolConfig: { max: Number(process.env.POOL_SIZE || 8) },
    }),
  ],
  grafserv: {
    port: Number(process.env.PORT),
    host: "127.0.0.1",
    pgJwtSecret: process.env.JWT_SECRET,
    pgJwtVerifyOptions: { audience: process.env.JWT_AUDIENCE },
  },
  grafast: { explain: false },
};
