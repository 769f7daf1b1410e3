"""Admin for items and API keys. Every write goes through `items.services`, so admin changes
produce the same events as API changes."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from items import services
from items.models import ApiKey, Item, normalise_asset

# django-stubs makes these generic in the model; Django's classes take no subscript at run time.
if TYPE_CHECKING:
    ItemFormBase = forms.ModelForm[Item]
    ItemAdminBase = admin.ModelAdmin[Item]
    ApiKeyAdminBase = admin.ModelAdmin[ApiKey]
else:
    ItemFormBase = forms.ModelForm
    ItemAdminBase = ApiKeyAdminBase = admin.ModelAdmin


class ItemForm(ItemFormBase):
    class Meta:
        model = Item
        fields = ("base", "quote", "name", "is_active", "pricing", "markup_bps")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["markup_bps"].required = False  # empty: no markup

    def clean_markup_bps(self) -> Decimal:
        value = self.cleaned_data.get("markup_bps")
        return Decimal(0) if value is None else value

    def clean_base(self) -> str:
        return normalise_asset(self.cleaned_data["base"])

    def clean_quote(self) -> str:
        return normalise_asset(self.cleaned_data["quote"])


@admin.register(Item)
class ItemAdmin(ItemAdminBase):
    form = ItemForm
    list_display: tuple[str, ...] = ("code", "name", "is_active", "pricing", "updated_at")
    list_filter = ("is_active", "quote", "base")
    search_fields = ("code", "name", "base", "quote")
    ordering = ("code",)
    actions = ("activate", "deactivate")

    def get_readonly_fields(self, request: HttpRequest, obj: Item | None = None) -> tuple[str, ...]:
        # A pair's identity never changes: create a new item instead of renaming one.
        readonly = ("code", "created_at", "updated_at")
        return ("base", "quote", *readonly) if obj else readonly

    def save_model(self, request: HttpRequest, obj: Item, form: Any, change: bool) -> None:
        if change:
            # `obj` already holds the form's values; the service compares against the stored row.
            services.item_update(
                item=Item.objects.get(pk=obj.pk),
                name=form.cleaned_data["name"],
                is_active=form.cleaned_data["is_active"],
                pricing=form.cleaned_data["pricing"] or None,
                markup_bps=form.cleaned_data["markup_bps"],
            )
        else:
            created = services.item_create(
                base=obj.base,
                quote=obj.quote,
                name=obj.name,
                is_active=obj.is_active,
                pricing=obj.pricing or None,
                markup_bps=obj.markup_bps,
            )
            obj.pk, obj.code = created.pk, created.code

    def delete_model(self, request: HttpRequest, obj: Item) -> None:
        services.item_delete(item=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Item]) -> None:
        for item in queryset:
            services.item_delete(item=item)

    @admin.action(description="Activate selected pairs")
    def activate(self, request: HttpRequest, queryset: QuerySet[Item]) -> None:
        for item in queryset:
            services.item_update(item=item, is_active=True)
        self.message_user(request, f"Activated {queryset.count()} pair(s).", messages.SUCCESS)

    @admin.action(description="Deactivate selected pairs")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Item]) -> None:
        for item in queryset:
            services.item_update(item=item, is_active=False)
        self.message_user(request, f"Deactivated {queryset.count()} pair(s).", messages.SUCCESS)


@admin.register(ApiKey)
class ApiKeyAdmin(ApiKeyAdminBase):
    list_display = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    actions = ("revoke",)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw_key = services.api_key_create(name=obj.name)
        obj.pk = created.pk
        # The only time the raw key is ever shown: it is not stored anywhere.
        self.message_user(
            request,
            f"API key created. Copy it now, it will not be shown again: {raw_key}",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for api_key in queryset:
            services.api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)
