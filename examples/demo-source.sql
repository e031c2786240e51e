-- Sample tables for the demo pipeline (examples/demo-pipeline.yaml).
CREATE TABLE IF NOT EXISTS public.customers (
    id    bigserial PRIMARY KEY,
    name  text NOT NULL,
    email text
);
CREATE TABLE IF NOT EXISTS public.orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint REFERENCES public.customers (id),
    amount      numeric(12, 2) NOT NULL,
    status      text NOT NULL DEFAULT 'new',
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- A row that exists before the pipeline: copied by its snapshot.
INSERT INTO public.customers (name, email)
SELECT 'Existing', 'existing@example.com' WHERE NOT EXISTS (SELECT 1 FROM public.customers);
